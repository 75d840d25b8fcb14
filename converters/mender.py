"""A bundle as a signed Mender Artifact (module-image, payload type `edgeguard-bundle`), written with the
real `mender-artifact` tool so a fleet's Mender server or `mender install` takes it as any other update.

The payload is one tar of the bundle; the protection summary travels as artifact provides (`mender-artifact
read` shows it, a server can group devices by it). The device side is `runtime/mender_module.py`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from runtime.fileio import fsync_dir
from runtime.mender_module import PAYLOAD_FILE, PAYLOAD_TYPE

from .signing import load_ota_key, ota_public_pem

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def tool() -> str:
    """The mender-artifact executable, or ValueError saying how to get it."""
    exe = shutil.which("mender-artifact")
    if exe is None:
        raise ValueError("--ota mender needs the mender-artifact tool (Debian/Ubuntu: apt-get install "
                         "mender-artifact; or Mender's own release)")
    return exe


def write_bundle_tar(bundle: Path, out: Path) -> None:
    """The bundle's files in a reproducible tar (sorted, owner 0, mtime 0, modes kept)."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(bundle.rglob("*")):
            if p.is_symlink():
                raise ValueError(f"{p}: a bundle holds no links")
            tf.add(p, arcname=p.relative_to(bundle).as_posix(), recursive=False, filter=clean)


def provides(bundle: Path, model_name: str, version: str | None = None) -> dict[str, str]:
    """The artifact provides: model name and version (default: the manifest's sha256, 12 digits), the
    manifest's sha256, method, verdict, robust SLC-AUC."""
    raw = (bundle / "manifest.json").read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    m = json.loads(raw)
    prot = m.get("protection") or {}
    slc = m.get("slc_auc") or {}
    robust = slc.get("robust-envelope") or (max(slc.values(), key=lambda e: e["slc_auc"]) if slc else None)
    return {"edgeguard.model_name": model_name, "edgeguard.model_version": version or sha[:12],
            "edgeguard.manifest_sha256": sha, "edgeguard.method": str(m.get("method")),
            "edgeguard.protection": str(prot.get("strength") or ("none" if not prot.get("protected") else "stated")),
            "edgeguard.robust_slc_auc": f"{robust['slc_auc']:+.3f}" if robust else "none"}


def write_mender_artifact(bundle: str | os.PathLike, out: str | os.PathLike, device_types: list[str],
                          key: str | os.PathLike, model_name: str, version: str | None = None) -> dict:
    """Write `out` (.mender), signed with the vendor's ECDSA P-256 key, then check it with `mender-artifact
    validate` against the key's public half before it is renamed into place."""
    exe = tool()
    bundle, out = Path(bundle), Path(out)
    if not device_types:
        raise ValueError("--ota mender needs at least one --device-type (e.g. jetson-orin-nano)")
    for name in [*device_types, model_name]:
        if not _NAME.match(name):
            raise ValueError(f"{name!r}: use letters, digits and . _ + - (device types and model names)")
    load_ota_key(key)
    meta = provides(bundle, model_name, version)
    version = meta["edgeguard.model_version"]
    if not _NAME.match(version):
        raise ValueError(f"--ota-version {version!r}: use letters, digits and . _ + -")
    name = f"{model_name}-{version}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mender-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        payload = tmp / PAYLOAD_FILE
        write_bundle_tar(bundle, payload)
        cmd = [exe, "write", "module-image", "-T", PAYLOAD_TYPE, "-n", name, "-f", str(payload), "-k", str(key),
               "-o", str(tmp / "out.mender"), "--software-name", "edgeguard", "--software-version", version]
        for dt in device_types:
            cmd += ["-t", dt]
        for k, v in meta.items():
            cmd += ["-p", f"{k}:{v}"]
        _run(cmd, "mender-artifact write")
        (tmp / "ota.pub").write_bytes(ota_public_pem(key))
        _run([exe, "validate", str(tmp / "out.mender"), "-k", str(tmp / "ota.pub")], "mender-artifact validate")
        os.replace(tmp / "out.mender", out)
    fsync_dir(out.parent)
    return {"artifact": str(out), "name": name, "device_types": list(device_types), "bytes": out.stat().st_size,
            "provides": meta}


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise ValueError(f"{what} failed (exit {r.returncode}): {lines[-1][:200] if lines else 'no output'}")
