"""A throwaway OpenSSH server on 127.0.0.1 that stands in for a camera: tests and the walkthrough deploy to it.

Fresh host and user keys, a free port, key-only login for the current user, a known_hosts file holding exactly
its host key, and a device root inside the folder. `python -m edgeguard.deploy.loopback start DIR` also writes
DIR/fleet.toml; `... stop DIR` ends it. Needs Debian's openssh-server (`apt install openssh-server`).
"""
from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeguardError


def find_sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                                        None)


@dataclass
class LoopbackDevice:
    dir: Path
    port: int
    user: str
    identity: Path
    known_hosts: Path
    host_key_pub: Path
    pid: int

    @property
    def root(self) -> Path:
        return self.dir / "home" / "edgeguard"

    def host(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def inventory(self, python: str = sys.executable, names: tuple[str, ...] = ("camera-1",)) -> str:
        """fleet.toml text: one [[device]] per name, each with its own root on this server."""
        lines = ["[defaults]", f'user = "{self.user}"', f"port = {self.port}", f'identity = "{self.identity}"',
                 f'known_hosts = "{self.known_hosts}"', f'python = "{python}"', ""]
        for n in names:
            lines += ["[[device]]", f'name = "{n}"', 'host = "127.0.0.1"',
                      f'root = "{self.dir / "home" / n}"', ""]
        return "\n".join(lines)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True)


def start(work_dir: str | os.PathLike, timeout: float = 15.0) -> LoopbackDevice:
    """Start sshd in the background on a free loopback port; returns once it accepts connections."""
    sshd = find_sshd()
    if sshd is None:
        raise EdgeguardError("sshd not found: install Debian's openssh-server (apt install openssh-server)")
    d = Path(work_dir).resolve()
    (d / "home").mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    for name in ("host_key", "user_key"):
        for p in (d / name, d / f"{name}.pub"):
            p.unlink(missing_ok=True)
    _keygen(d / "host_key", "edgeguard-loopback-host")
    _keygen(d / "user_key", "edgeguard-loopback-user")
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
""")
    log = open(d / "sshd.log", "ab")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log,
                            start_new_session=True)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise EdgeguardError(f"sshd exited at start: {(d / 'sshd.log').read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise EdgeguardError(f"sshd did not answer on 127.0.0.1:{port} within {timeout:.0f} s")
    (d / "sshd.pid.edgeguard").write_text(str(proc.pid))
    return LoopbackDevice(dir=d, port=port, user=getpass.getuser(), identity=d / "user_key",
                          known_hosts=d / "known_hosts", host_key_pub=d / "host_key.pub", pid=proc.pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeguard.deploy.loopback", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir")
    p.add_argument("--devices", type=int, default=1, help="How many device entries (roots) fleet.toml gets.")
    args = p.parse_args(argv)
    d = Path(args.dir)
    if args.action == "stop":
        pid_file = d / "sshd.pid.edgeguard"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            pid_file.unlink()
        print(f"stopped the loopback device in {d}")
        return 0
    try:
        dev = start(d)
    except EdgeguardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = tuple(f"camera-{i + 1}" for i in range(args.devices))
    (d / "fleet.toml").write_text(dev.inventory(names=names))
    print(f"sshd on 127.0.0.1:{dev.port} (pid {dev.pid}); inventory: {d / 'fleet.toml'}")
    print(f"deploy:  edgeguard deploy BUNDLE --inventory {d / 'fleet.toml'} --public-key vendor.pub")
    print(f"stop:    python -m edgeguard.deploy.loopback stop {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
