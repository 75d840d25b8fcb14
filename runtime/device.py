"""A device's bundle store: staged bundles, the `current` and `previous` links, the trusted key.

Layout under the device root (default ~/edgeguard), written only by `edgeguard deploy` through this module:

    bundles/<id>/     validated or being validated bundles (<id>: `bundle_digest`, a hash of every file, signature included)
    current -> bundles/<id>     what the camera runs; switched by one atomic rename of a symlink
    previous -> bundles/<id>    the bundle before it (`rollback` swaps the two)
    incoming/         uploads in progress (a cut upload leaves debris here, never in bundles/ or current)
    lib/<wheel-id>/   installed runtime wheels; runtime.id names the one in use
    reports/<id>.*.json         validation and latency reports
    trusted.pub       the vendor key the device trusts (installed by the first deploy, never replaced silently)

`python -m runtime.device status|stage|activate|rollback|discard ROOT ...` prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from .fileio import atomic_write_bytes, sha256_file


class DeviceError(Exception):
    pass


def bundle_digest(bundle: str | os.PathLike, hashes: dict[str, str] | None = None) -> str:
    """16 hex digits naming a bundle by all of its files (paths and sha256, manifest.sig included).

    `hashes` (relative path → sha256) skips re-reading files whose hashes the caller already has.
    """
    bundle = Path(bundle)
    if hashes is None:
        hashes = {p.relative_to(bundle).as_posix(): sha256_file(p) for p in bundle.rglob("*") if p.is_file()}
    lines = sorted(f"{h}  {rel}\n" for rel, h in hashes.items()
                   if Path(rel).name != "model.engine")  # the engine is built on the device
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _link_target(root: Path, name: str) -> str | None:
    link = root / name
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def _set_link(root: Path, name: str, bundle_id: str | None) -> None:
    """Point root/name at bundles/<id> with one rename (readers never see a missing link)."""
    link = root / name
    if bundle_id is None:
        if link.is_symlink():
            link.unlink()
        return
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}"
    os.symlink(f"bundles/{bundle_id}", tmp)
    os.replace(tmp, link)


def status(root: str | os.PathLike) -> dict:
    root = Path(root)
    runtime_id = (root / "runtime.id").read_text().strip() if (root / "runtime.id").exists() else None
    bundles = sorted(p.name for p in (root / "bundles").iterdir()) if (root / "bundles").is_dir() else []
    return {"root": str(root.resolve()), "current": _link_target(root, "current"),
            "previous": _link_target(root, "previous"), "runtime": runtime_id, "bundles": bundles,
            "trusted_key": (root / "trusted.pub").exists()}


def stage(root: str | os.PathLike, incoming: str | os.PathLike, bundle_id: str, key: str | None = None) -> dict:
    """Move an uploaded, hash-checked bundle into bundles/<id>; install the trusted key on first contact."""
    root, incoming = Path(root), Path(incoming)
    src = incoming / "bundle"
    if not (src / "manifest.json").exists():
        raise DeviceError(f"{src}: no manifest.json: the upload is incomplete")
    got = bundle_digest(src)
    if got != bundle_id:
        raise DeviceError(f"the uploaded bundle hashes to {got}, expected {bundle_id}")
    (root / "bundles").mkdir(parents=True, exist_ok=True)
    dest = root / "bundles" / bundle_id
    if dest.exists():
        if bundle_id in (_link_target(root, "current"), _link_target(root, "previous")):
            shutil.rmtree(src)  # in use: never rewrite a live bundle in place; the upload was identical by hash
        else:
            shutil.rmtree(dest)
            os.replace(src, dest)
    else:
        os.replace(src, dest)
    trusted = root / "trusted.pub"
    key_note = "kept"
    if key:
        key_bytes = Path(key).read_bytes()
        if not trusted.exists():
            atomic_write_bytes(trusted, key_bytes)
            key_note = "installed"
        elif trusted.read_bytes() != key_bytes:
            key_note = "differs"  # the device keeps trusting its own key; validation will use it
    shutil.rmtree(incoming, ignore_errors=True)
    return {"staged": bundle_id, "path": str(dest.resolve()), "trusted_key": key_note}


def activate(root: str | os.PathLike, bundle_id: str) -> dict:
    """current → bundle_id, previous → the old current; bundles that are neither are removed."""
    root = Path(root)
    if not (root / "bundles" / bundle_id).is_dir():
        raise DeviceError(f"bundle {bundle_id} is not staged on this device")
    old = _link_target(root, "current")
    if old is not None and old != bundle_id:
        _set_link(root, "previous", old)
    _set_link(root, "current", bundle_id)
    _prune(root)
    return status(root)


def rollback(root: str | os.PathLike) -> dict:
    """Swap current and previous."""
    root = Path(root)
    cur, prev = _link_target(root, "current"), _link_target(root, "previous")
    if prev is None or not (root / "bundles" / prev).is_dir():
        raise DeviceError("no previous bundle to roll back to")
    _set_link(root, "current", prev)
    _set_link(root, "previous", cur)
    return status(root)


def discard(root: str | os.PathLike, bundle_id: str) -> dict:
    """Remove a staged bundle that failed validation (never the current or previous one)."""
    root = Path(root)
    if bundle_id not in (_link_target(root, "current"), _link_target(root, "previous")):
        shutil.rmtree(root / "bundles" / bundle_id, ignore_errors=True)
    return status(root)


def _prune(root: Path) -> None:
    keep = {_link_target(root, "current"), _link_target(root, "previous")}
    for p in (root / "bundles").iterdir():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.device", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status").add_argument("root")
    s = sub.add_parser("stage")
    s.add_argument("root")
    s.add_argument("incoming")
    s.add_argument("bundle_id")
    s.add_argument("--key", default=None)
    for name in ("activate", "discard"):
        a = sub.add_parser(name)
        a.add_argument("root")
        a.add_argument("bundle_id")
    sub.add_parser("rollback").add_argument("root")
    args = p.parse_args(argv)
    try:
        if args.cmd == "status":
            out = status(args.root)
        elif args.cmd == "stage":
            out = stage(args.root, args.incoming, args.bundle_id, args.key)
        elif args.cmd == "activate":
            out = activate(args.root, args.bundle_id)
        elif args.cmd == "discard":
            out = discard(args.root, args.bundle_id)
        else:
            out = rollback(args.root)
    except (DeviceError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
