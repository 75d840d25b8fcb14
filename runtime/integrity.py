"""Bundle integrity: signature, file hashes, mask hash, "mask zeros ⊆ weight zeros", engine compatibility.

Each check yields a `Check(name, ok, detail)`; `verify_bundle` raises IntegrityError at the first failure
(with the check's name and where it failed) unless `collect=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import maskbits
from .fileio import sha256_file
from .manifest import BundleError, IntegrityError, Manifest, load_manifest, load_public_key, verify_signature


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _inside(bundle: Path, rel: str) -> Path:
    p = (bundle / rel).resolve()
    if bundle.resolve() not in p.parents and p != bundle.resolve():
        raise IntegrityError(f"files: {rel!r} points outside the bundle")
    return p


def onnx_initializers(model_path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The named initializers of an ONNX model (external data included), as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(model_path), load_external_data=True)
    except Exception as e:
        raise IntegrityError(f"model: {model_path} is not a readable ONNX model ({str(e).splitlines()[0]})") from None
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if names is None or i.name in names}


def check_mask_zeros(model_path: Path, bits: bytes, manifest: Manifest) -> Check:
    masks = maskbits.unpack(bits, manifest.mask.layout)
    init = onnx_initializers(model_path, set(manifest.mask.initializers.values()))
    by_init = {}
    for layer, arr in masks.items():
        name = manifest.mask.initializers.get(layer)
        if name is None:
            return Check("mask-zeros", False, f"layer {layer!r} has no initializer mapping in the manifest")
        if name not in init:
            return Check("mask-zeros", False, f"initializer {name!r} (layer {layer}) is not in {model_path.name}")
        w = init[name]
        if w.shape != arr.shape:
            return Check("mask-zeros", False, f"initializer {name!r} has shape {w.shape}, the mask {arr.shape}")
        by_init[layer] = w
    bad = maskbits.zero_violations(masks, by_init)
    if bad:
        layer, n = next(iter(bad.items()))
        return Check("mask-zeros", False, f"{sum(bad.values())} masked weights are not 0 (first: {n} in layer "
                                          f"{layer!r} = initializer {manifest.mask.initializers[layer]!r})")
    return Check("mask-zeros", True, f"{sum(int((~m).sum()) for m in masks.values()):,} masked weights are 0")


def verify_bundle(bundle: str | Path, public_key: str | Path | None = None, engine: str | Path | None = None,
                  require_signature: bool = True) -> tuple[Manifest, list[Check]]:
    """Run every integrity check; raise IntegrityError (exit 1) or BundleError (exit 2) on the first failure."""
    bundle = Path(bundle)
    manifest, raw = load_manifest(bundle)
    checks: list[Check] = []

    sig_path = bundle / "manifest.sig"
    if public_key is not None:
        key = load_public_key(public_key)
        if not sig_path.exists():
            raise IntegrityError("signature: manifest.sig is missing")
        verify_signature(raw, sig_path.read_bytes(), key)
        checks.append(Check("signature", True, "manifest.sig verifies (Ed25519)"))
    elif require_signature:
        raise BundleError("no --public-key given: the device must check the vendor's signature "
                          "(pass --public-key vendor.pub, or --allow-unsigned for a bench test)")
    else:
        checks.append(Check("signature", True, "not checked (--allow-unsigned)"))

    for entry in [manifest.model, *manifest.files]:
        path = _inside(bundle, entry.path)
        if not path.exists():
            raise IntegrityError(f"files: {entry.path} is listed in the manifest but missing")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise IntegrityError(f"files: sha256 of {entry.path} does not match the manifest (file {digest[:16]}…, "
                                 f"manifest {entry.sha256[:16]}…): the file was modified")
    checks.append(Check("files", True, f"{1 + len(manifest.files)} files match their sha256"))

    for check in [manifest.authorised, *manifest.unauthorised]:
        p = _inside(bundle, check.file)
        if not p.exists() or sha256_file(p) != check.sha256:
            raise IntegrityError(f"files: validation set {check.file} is missing or modified")

    bits_path = _inside(bundle, manifest.mask.file)
    if not bits_path.exists():
        raise IntegrityError(f"mask: {manifest.mask.file} is missing")
    bits = bits_path.read_bytes()
    if maskbits.digest(bits) != manifest.mask.sha256:
        raise IntegrityError(f"mask: sha256 of {manifest.mask.file} does not match the manifest")
    try:
        maskbits.unpack(bits, manifest.mask.layout)
    except ValueError as e:
        raise IntegrityError(f"mask: {e}") from None
    checks.append(Check("mask-hash", True, manifest.mask.sha256))

    zeros = check_mask_zeros(_inside(bundle, manifest.model.path), bits, manifest)
    if not zeros.ok:
        raise IntegrityError(f"mask-zeros: {zeros.detail}")
    checks.append(zeros)

    if engine is not None:
        checks.append(check_engine(Path(engine), manifest))
    return manifest, checks


def check_engine(engine: Path, manifest: Manifest) -> Check:
    """An engine file must exist, be non-trivial, and (where TensorRT is here) match its version and GPU."""
    from .backends import tensorrt_backend

    if not engine.exists():
        raise BundleError(f"{engine}: engine file not found")
    size = engine.stat().st_size
    if size < 1024:
        raise IntegrityError(f"engine: {engine} is only {size} bytes: truncated")
    info = manifest.engine or {}
    if info.get("sha256") and sha256_file(engine) != info["sha256"]:
        raise IntegrityError(f"engine: sha256 of {engine.name} does not match the manifest")
    ver = tensorrt_backend.trt_version()
    want_ver = info.get("tensorrt_version") or manifest.target.tensorrt_version
    if ver and want_ver and ver.split(".")[:2] != str(want_ver).split(".")[:2]:
        raise IntegrityError(f"engine: built for TensorRT {want_ver}, this device has {ver}; rebuild with "
                             "build_engine.sh")
    cc = tensorrt_backend.device_compute_capability()
    want_cc = info.get("compute_capability") or manifest.target.compute_capability
    if cc and want_cc and cc != want_cc:
        raise IntegrityError(f"engine: built for compute capability {want_cc}, this GPU is {cc}; rebuild with "
                             "build_engine.sh")
    return Check("engine", True, f"{engine.name}: {size:,} bytes"
                 + ("" if ver else " (TensorRT not installed: version and GPU not checked)"))
