"""The Mender update module `edgeguard-bundle` (update-module protocol v3), run by the Mender client as
`edgeguard-bundle STATE FILES_DIR`. It installs a bundle into the device's bundle store (`runtime.device`):

    ArtifactInstall   unpack the payload into a new slot (bundles/<id>), run `edgeguard-runtime validate` with
                      the vendor's key (ROOT/trusted.pub; and oms.sig with ROOT/trusted-oms.pub where the [oms]
                      extra is installed; the engine build first where trtexec exists); a failed validation
                      removes the slot and fails the install, `current` untouched. The bundle that is already
                      current installs as a no-op.
    ArtifactCommit    switch `current` to the new slot (one atomic rename), `previous` to the old one
    ArtifactRollback  before the commit: drop the new slot; after it: switch back (current ↔ previous)
    ArtifactFailure, Cleanup    remove debris (unpacked uploads, slots nobody points at)

The device root is $EDGEGUARD_DEVICE_ROOT (default /var/lib/edgeguard). `python -m runtime.mender_module
install-module [--modules-dir DIR] [--root ROOT]` writes the launcher Mender runs (default DIR:
/usr/share/mender/modules/v3, where the Debian mender-client 3.4 looks; it is not configurable there).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

from . import device
from .fileio import atomic_write_text

PAYLOAD_TYPE = "edgeguard-bundle"
PAYLOAD_FILE = "edgeguard-bundle.tar"
DEFAULT_ROOT = "/var/lib/edgeguard"
DEFAULT_MODULES_DIR = "/usr/share/mender/modules/v3"
PENDING = "ota-pending.json"  # the slot an install validated and a commit (or rollback) has not yet decided


class ModuleError(Exception):
    pass


def _root() -> Path:
    return Path(os.environ.get("EDGEGUARD_DEVICE_ROOT") or DEFAULT_ROOT)


def _log(msg: str) -> None:
    print(f"edgeguard-bundle: {msg}", file=sys.stderr, flush=True)


def _pending(root: Path) -> dict | None:
    try:
        return json.loads((root / PENDING).read_text())
    except (OSError, ValueError):
        return None


def _extract(payload: Path, dest: Path) -> None:
    """Unpack the bundle tar: regular files and folders only, every name inside `dest`."""
    dest.mkdir(parents=True)
    with tarfile.open(payload) as tf:
        for m in tf.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or dest.resolve() not in target.parents:
                raise ModuleError(f"payload entry {m.name!r} is not a plain file inside the bundle")
        tf.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(dest)


def _validate(root: Path, slot: Path, bundle_id: str) -> None:
    """`edgeguard-runtime validate` on the slot with the device's own keys (after the engine build, where
    TensorRT is here); ModuleError with its one-line verdict if it does not pass."""
    from .cli import main as runtime_main

    args = ["validate", str(slot), "--public-key", str(root / "trusted.pub")]
    oms_key = root / "trusted-oms.pub"
    if oms_key.exists():
        from .oms import available

        if available():
            args += ["--oms-public-key", str(oms_key)]
    if shutil.which("trtexec") and (slot / "build_engine.sh").exists():
        r = subprocess.run(["sh", str(slot / "build_engine.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            raise ModuleError(f"build_engine.sh failed (exit {r.returncode})")
        if (slot / "model.engine").exists():
            args += ["--engine", str(slot / "model.engine")]
    (root / "reports").mkdir(parents=True, exist_ok=True)
    args += ["--report", str(root / "reports" / f"{bundle_id}.validate.json")]
    code = runtime_main(args)
    if code != 0:
        raise ModuleError(f"validation failed (exit {code}); the running bundle is untouched")


def artifact_install(files: Path) -> None:
    root = _root()
    if not (root / "trusted.pub").is_file():
        raise ModuleError(f"{root}/trusted.pub is missing: install the vendor's public key there first")
    payload = files / "files" / PAYLOAD_FILE
    if not payload.is_file():
        raise ModuleError(f"the artifact carries no {PAYLOAD_FILE}")
    (root / PENDING).unlink(missing_ok=True)  # an install nobody committed is superseded by this one
    cleanup()  # and a killed one's debris goes: unpacked uploads, slots nobody points at
    incoming = root / "incoming" / uuid.uuid4().hex[:12]
    try:
        _extract(payload, incoming / "bundle")
        bundle_id = device.bundle_digest(incoming / "bundle")
        current = device.status(root)["current"] if (root / "bundles").is_dir() else None
        if bundle_id == current:
            atomic_write_text(root / PENDING, json.dumps({"id": bundle_id, "noop": True}))
            _log(f"bundle {bundle_id} is already current: nothing to install")
            return
        device.stage(root, incoming, bundle_id)
        slot = root / "bundles" / bundle_id
        try:
            _validate(root, slot, bundle_id)
        except ModuleError:
            device.discard(root, bundle_id)
            raise
        atomic_write_text(root / PENDING, json.dumps({"id": bundle_id, "previous": current}))
        _log(f"bundle {bundle_id} validated in its slot; commit switches current to it")
    except (tarfile.TarError, OSError, device.DeviceError) as e:
        raise ModuleError(f"cannot install the payload ({e})") from None
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def artifact_commit() -> None:
    root = _root()
    p = _pending(root)
    if p is None:
        raise ModuleError("nothing to commit: no validated install is pending")
    if not p.get("noop"):
        device.activate(root, p["id"])
        _log(f"current → {p['id']}")
    (root / PENDING).unlink(missing_ok=True)


def artifact_rollback() -> None:
    """Idempotent: Mender may call it after a failed install, after a kill, or twice."""
    root = _root()
    p = _pending(root)
    if p is not None and not p.get("noop"):
        st = device.status(root)
        if st["current"] == p["id"] and p.get("previous") and st["previous"] == p["previous"]:
            device.rollback(root)  # the commit had switched; switch back
            _log(f"current → {p['previous']} (rolled back)")
        else:
            device.discard(root, p["id"])
    (root / PENDING).unlink(missing_ok=True)
    cleanup()


def cleanup() -> None:
    """Remove unpacked uploads and slots that neither current, previous nor a pending install point at."""
    root = _root()
    shutil.rmtree(root / "incoming", ignore_errors=True)
    if not (root / "bundles").is_dir():
        return
    st = device.status(root)
    p = _pending(root)
    keep = {st["current"], st["previous"], p["id"] if p else None}
    for slot in (root / "bundles").iterdir():
        if slot.name not in keep:
            shutil.rmtree(slot, ignore_errors=True)


def install_module(modules_dir: str, root: str) -> Path:
    """Write the `edgeguard-bundle` launcher Mender runs: this Python, this runtime, this device root."""
    here = Path(__file__).resolve().parent.parent
    script = Path(modules_dir) / PAYLOAD_TYPE
    script.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        "#!/bin/sh", "# Mender update module for edgeguard bundles (protocol v3); written by "
        "`edgeguard-mender-module install-module`.",
        f': "${{EDGEGUARD_DEVICE_ROOT:={root}}}"', "export EDGEGUARD_DEVICE_ROOT",
        f'PYTHONPATH="{here}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" -m runtime.mender_module "$@"', ""])
    atomic_write_text(script, text)
    os.chmod(script, 0o755)
    return script


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "install-module":
        p = argparse.ArgumentParser(prog="edgeguard-mender-module install-module",
                                    description="Write the edgeguard-bundle update module for the Mender client.")
        p.add_argument("--modules-dir", default=DEFAULT_MODULES_DIR)
        p.add_argument("--root", default=DEFAULT_ROOT, help="The device's bundle store.")
        a = p.parse_args(argv[1:])
        print(install_module(a.modules_dir, a.root))
        return 0
    if len(argv) < 1:
        print("usage: edgeguard-bundle STATE [FILES_DIR]  (run by the Mender client)", file=sys.stderr)
        return 2
    state, files = argv[0], Path(argv[1]) if len(argv) > 1 else Path(".")
    try:
        if state == "NeedsArtifactReboot":
            print("No")
        elif state == "SupportsRollback":
            print("Yes")
        elif state == "ArtifactInstall":
            artifact_install(files)
        elif state == "ArtifactCommit":
            artifact_commit()
        elif state in ("ArtifactRollback", "ArtifactFailure"):
            artifact_rollback()
        elif state == "Cleanup":
            cleanup()
        return 0  # Download, ArtifactVerifyReboot, … : nothing to do
    except (ModuleError, device.DeviceError, OSError) as e:
        _log(f"{state}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
