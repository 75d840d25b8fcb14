"""Loopback Mender devices: several device roots on this machine, each with its own `mender-client` standalone
data folder and configuration, installing artifacts exactly as a camera would (`mender install FILE`, then
`mender commit` or `mender rollback`). Tests and benchmarks/bench_mender_fleet.py use them.

The Debian mender-client 3.4 looks for update modules only in /usr/share/mender/modules/v3 and falls back to
/etc/mender/artifact_info before a device's first install, so `prepare_host` writes both (root, or a
writable /usr/share/mender and /etc/mender). Each device's bundle store is passed to the module through
$EDGEGUARD_DEVICE_ROOT, which the client hands on to its update modules.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runtime import device as store
from runtime.mender_module import DEFAULT_MODULES_DIR, PAYLOAD_TYPE, install_module

ARTIFACT_INFO = Path("/etc/mender/artifact_info")


def missing() -> str | None:
    """Why loopback Mender devices cannot run here, or None."""
    for exe, pkg in (("mender", "mender-client"), ("mender-artifact", "mender-artifact")):
        if shutil.which(exe) is None:
            return f"{exe} not installed (Debian: apt-get install {pkg})"
    for folder in (Path(DEFAULT_MODULES_DIR), ARTIFACT_INFO.parent):
        probe = folder if folder.exists() else folder.parent
        if not os.access(probe, os.W_OK):
            return f"{folder} is not writable here (the Mender client reads its update modules from there; run as root)"
    return None


def prepare_host() -> Path:
    """Install the edgeguard-bundle update module for this Python and runtime, and the first-install fallback."""
    script = install_module(DEFAULT_MODULES_DIR, "/var/lib/edgeguard")
    if not ARTIFACT_INFO.exists():
        ARTIFACT_INFO.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT_INFO.write_text("artifact_name=factory-image\n")
    return script


@dataclass
class MenderDevice:
    dir: Path

    @property
    def store(self) -> Path:  # the edgeguard bundle store (current, previous, bundles/, trusted.pub)
        return self.dir / "store"

    @property
    def data(self) -> Path:  # the Mender client's own state
        return self.dir / "mender"

    def command(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """The `mender` command line for this device and the environment that points the module at its store."""
        cmd = ["mender", "--no-syslog", "--config", str(self.dir / "mender.conf"), "--fallback-config",
               str(self.dir / "fallback.conf"), "--data", str(self.data), *args]
        return cmd, {**os.environ, "EDGEGUARD_DEVICE_ROOT": str(self.store)}

    def mender(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd, env = self.command(*args)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)

    def install(self, artifact: str | os.PathLike) -> subprocess.CompletedProcess:
        return self.mender("install", str(Path(artifact).resolve()))

    def commit(self) -> subprocess.CompletedProcess:
        return self.mender("commit")

    def rollback(self) -> subprocess.CompletedProcess:
        return self.mender("rollback")

    def status(self) -> dict:
        return store.status(self.store)

    def artifact_name(self) -> str:
        return self.mender("show-artifact").stdout.strip()


def make_device(folder: str | os.PathLike, device_type: str, ota_public_key: str | os.PathLike,
                trusted_key: str | os.PathLike, oms_public_key: str | os.PathLike | None = None) -> MenderDevice:
    """A fresh device: Mender data folder and config (ArtifactVerifyKey: the vendor's OTA key), a bundle store
    that trusts the vendor's Ed25519 key (and its OTA key for oms.sig, where given)."""
    d = MenderDevice(Path(folder).resolve())
    d.data.mkdir(parents=True, exist_ok=True)
    d.store.mkdir(parents=True, exist_ok=True)
    (d.data / "device_type").write_text(f"device_type={device_type}\n")
    shutil.copyfile(trusted_key, d.store / "trusted.pub")
    if oms_public_key is not None:
        shutil.copyfile(oms_public_key, d.store / "trusted-oms.pub")
    conf = {"ArtifactVerifyKey": str(Path(ota_public_key).resolve()), "DeviceTypeFile": str(d.data / "device_type")}
    (d.dir / "mender.conf").write_text(json.dumps(conf, indent=2) + "\n")
    return d


__all__ = ["MenderDevice", "PAYLOAD_TYPE", "make_device", "missing", "prepare_host"]
