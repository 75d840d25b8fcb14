"""OpenSSH through subprocess: one `ssh` per remote step over one shared connection per device (ControlMaster),
strict host-key checking, tar-streamed uploads.

Why OpenSSH and not an SSH library: it is already on every workstation and every Jetson, it honours the
user's ~/.ssh/config, agent, ProxyJump and known_hosts exactly as their own `ssh` does, and it adds no
cryptography of ours to audit. Host keys are never trusted blindly: `StrictHostKeyChecking=yes` unless the
user asks for `accept-new` (first contact only; a *changed* key is refused either way).
"""
from __future__ import annotations

import contextlib
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeguardError


class SshError(EdgeguardError):
    """A remote step failed; `kind` is 'host-key', 'connect' or 'remote'."""

    exit_code = 1

    def __init__(self, message: str, kind: str = "remote"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Device:
    """One SSH-reachable device and how to reach it."""

    host: str
    user: str | None = None
    port: int = 22
    name: str = ""
    identity: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    root: str = "~/edgeguard"
    python: str = "python3"
    connect_timeout: int = 10
    ssh_options: list[str] = field(default_factory=list)
    control_dir: str | None = None  # a private folder for a shared (multiplexed) connection; None: one per call

    def __post_init__(self):
        if not self.name:
            self.name = f"{self.user + '@' if self.user else ''}{self.host}" + (f":{self.port}" if self.port != 22 else "")

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def root_expr(root: str) -> str:
    """A shell word for the device root: `~/x` expands to the remote $HOME, everything else is quoted."""
    if root == "~":
        return '"$HOME"'
    if root.startswith("~/"):
        return '"$HOME"/' + shlex.quote(root[2:])
    return shlex.quote(root)


def ssh_argv(dev: Device, command: str) -> list[str]:
    argv = ["ssh", "-p", str(dev.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={dev.connect_timeout}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
            "-o", f"StrictHostKeyChecking={'accept-new' if dev.accept_new_host_key else 'yes'}"]
    if dev.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={Path(dev.known_hosts).expanduser()}",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    if dev.identity:
        argv += ["-i", str(Path(dev.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
    argv += _control_options(dev)
    for opt in dev.ssh_options:
        argv += ["-o", opt]
    return argv + [dev.destination, command]


def _control_options(dev: Device) -> list[str]:
    """One TCP connection and authentication per device for a whole deploy (OpenSSH ControlMaster): the
    socket lives in a private 0700 folder and closes 60 s after the last use, or at `close_master`."""
    if not dev.control_dir:
        return []
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={Path(dev.control_dir) / '%C'}",
            "-o", "ControlPersist=60"]


def close_master(dev: Device) -> None:
    """End the device's shared connection (no error if there is none)."""
    if not dev.control_dir:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["ssh", "-p", str(dev.port), *_control_options(dev), "-O", "exit", dev.destination],
                       capture_output=True, timeout=10)


def raise_for(dev: Device, returncode: int, stderr: str, what: str) -> None:
    text = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key for" in text and "has changed" in text:
        raise SshError(f"{dev.name}: host key has CHANGED since it was recorded: refusing (if the device was "
                       "re-imaged, remove its old line from known_hosts)", "host-key")
    if "Host key verification failed" in text or "No ED25519 host key is known" in text or \
            "host key is known" in text:
        raise SshError(f"{dev.name}: host key not in known_hosts: refusing to trust it blindly (add it to "
                       "known_hosts, or pass --accept-new-host-key for a first contact)", "host-key")
    if returncode == 255:
        last = text.splitlines()[-1] if text else "no answer"
        raise SshError(f"{dev.name}: ssh failed during {what}: {last}", "connect")
    last = text.splitlines()[-1] if text else f"exit status {returncode}"
    raise SshError(f"{dev.name}: {what} failed on the device: {last}", "remote")


def run(dev: Device, command: str, what: str, stdin: str | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run one shell command on the device; raise SshError (with the reason) when it fails and `check`."""
    try:
        proc = subprocess.run(ssh_argv(dev, command), input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SshError(f"{dev.name}: {what} timed out after {timeout:.0f} s", "connect") from None
    except FileNotFoundError:
        raise SshError("the `ssh` client is not installed on this machine (Debian: apt install openssh-client)",
                       "connect") from None
    if check and proc.returncode != 0:
        raise_for(dev, proc.returncode, proc.stderr or proc.stdout, what)
    return proc


class _Counter:
    """A write-only file that forwards to `out` and reports the running byte count."""

    def __init__(self, out, on_bytes: Callable[[int], None] | None):
        self.out, self.on_bytes, self.n = out, on_bytes, 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.n += len(data)
        if self.on_bytes:
            self.on_bytes(self.n)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def upload(dev: Device, files: Iterable[tuple[str, Path]], remote_dir: str, on_bytes: Callable[[int], None] | None
           = None, timeout: float = 600) -> int:
    """Stream (arcname, local path) pairs as a tar into `remote_dir` (a shell word) on the device."""
    err_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(ssh_argv(dev, f"mkdir -p {remote_dir} && tar -x -C {remote_dir} -f -"),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file)
    counter = _Counter(proc.stdin, on_bytes)
    try:
        with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for arcname, path in files:
                tar.add(str(path), arcname=arcname, recursive=False)
    except (BrokenPipeError, ConnectionResetError, OSError):
        pass  # the reason is in ssh's stderr and exit status, read below
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SshError(f"{dev.name}: upload timed out after {timeout:.0f} s", "connect") from None
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    if proc.returncode != 0:
        raise_for(dev, proc.returncode, err or "connection lost", "upload")
    return counter.n
