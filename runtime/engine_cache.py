"""A device-level TensorRT engine and timing cache, so re-deploying the same model builds nothing.

An engine is specific to (the ONNX model, the TensorRT version, the GPU's compute capability, the precision):
that tuple, hashed, is its key. `build_engine.sh` asks `python3 -m runtime.engine_cache lookup .` for a cached
engine before it runs trtexec and stores the one it builds (`store`); the timing cache is shared by every
engine of one TensorRT version and GPU. The cache lives in $EDGEGUARD_ENGINE_CACHE (default
~/.cache/edgeguard/engines). Where the TensorRT version or the GPU cannot be read, there is no key and the
engine is simply built (never a wrong engine from the cache).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from .fileio import atomic_path, sha256_file


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEGUARD_ENGINE_CACHE") or Path.home() / ".cache" / "edgeguard" / "engines")


def device_facts() -> tuple[str | None, str | None]:
    """(TensorRT version, compute capability) of this device; EDGEGUARD_TRT_VERSION and
    EDGEGUARD_COMPUTE_CAPABILITY override (a bench with a known device, tests)."""
    ver = os.environ.get("EDGEGUARD_TRT_VERSION")
    cc = os.environ.get("EDGEGUARD_COMPUTE_CAPABILITY")
    if ver is None or cc is None:
        from .backends import tensorrt_backend

        ver = ver or tensorrt_backend.trt_version()
        cc = cc or (tensorrt_backend.device_compute_capability() if tensorrt_backend.is_available() else None)
    return ver, cc


def cache_key(onnx_sha256: str, trt_version: str, compute_capability: str, precision: str) -> str:
    text = f"onnx={onnx_sha256}|tensorrt={trt_version}|sm={compute_capability}|precision={precision}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    return f"timing-trt{trt_version}-sm{compute_capability}.cache"


def bundle_key(bundle: Path) -> str | None:
    from .manifest import load_manifest

    manifest, _ = load_manifest(bundle)
    ver, cc = device_facts()
    if not ver or not cc:
        return None
    return cache_key(sha256_file(bundle / manifest.model.path), ver, cc, manifest.target.precision)


def main(argv: list[str] | None = None) -> int:
    """`lookup BUNDLE` copies a cached engine to BUNDLE/model.engine (exit 0) or exits 1;
    `store BUNDLE` keeps BUNDLE/model.engine in the cache; `timing-cache` prints the shared timing cache path."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 1 or args[0] not in ("lookup", "store", "timing-cache", "key"):
        print("usage: python -m runtime.engine_cache lookup|store|key BUNDLE | timing-cache", file=sys.stderr)
        return 2
    if args[0] == "timing-cache":
        ver, cc = device_facts()
        if not ver or not cc:
            return 1
        cache_dir().mkdir(parents=True, exist_ok=True)
        print(cache_dir() / timing_cache_name(ver, cc))
        return 0
    bundle = Path(args[1] if len(args) > 1 else ".")
    try:
        key = bundle_key(bundle)
    except Exception as e:  # noqa: BLE001 — a cache must never break the build: build without it
        print(f"engine cache: not used ({type(e).__name__})", file=sys.stderr)
        return 1
    if key is None:
        print("engine cache: TensorRT version or GPU unknown here; building without the cache", file=sys.stderr)
        return 1
    cached = cache_dir() / f"{key}.engine"
    if args[0] == "key":
        print(key)
        return 0
    if args[0] == "lookup":
        if not cached.is_file():
            return 1
        with atomic_path(bundle / "model.engine") as tmp:
            shutil.copyfile(cached, tmp)
        print(f"engine: from the device cache ({cached.name})")
        return 0
    engine = bundle / "model.engine"
    if not engine.is_file():
        print(f"engine cache: {engine} does not exist", file=sys.stderr)
        return 1
    with atomic_path(cached) as tmp:
        shutil.copyfile(engine, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
