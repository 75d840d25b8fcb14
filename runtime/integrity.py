"""Bundle integrity: signature, file hashes, no unlisted files, mask hash, "mask zeros ⊆ weight zeros",
engine compatibility.

Order matters: the signature is checked over manifest.json's raw bytes before the manifest is parsed, and
nothing in the bundle is opened before the manifest says what it is. Each check yields a
`Check(name, ok, detail)`; `verify_bundle` raises IntegrityError (exit 1) or BundleError (exit 2) at the
first failure, with one line that names the check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import maskbits
from .fileio import sha256_file
from .manifest import BundleError, IntegrityError, Manifest, load_public_key, read_manifest

# Files a device writes into a bundle folder itself (not in the signed manifest): the engine and caches.
DEVICE_FILES = frozenset({"model.engine", "timing.cache"})
SIGNED_FILES = frozenset({"manifest.json", "manifest.sig", "oms.sig"})  # signatures, not listed in the manifest


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _inside(bundle: Path, rel: str) -> Path:
    """The listed file, which must be a regular file inside the bundle (symlinks may not leave it)."""
    try:
        root = bundle.resolve()
        p = (bundle / rel).resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop, a name the OS refuses
        raise IntegrityError(f"files: {rel!r} cannot be resolved ({type(e).__name__}: a symlink loop?)") from None
    if root not in p.parents:
        raise IntegrityError(f"files: {rel!r} points outside the bundle")
    return p


def _read(path: Path, rel: str, reader):
    """`reader(path)` of a listed file, which must exist and be a regular file; one-line errors otherwise."""
    try:
        if not path.exists():
            raise IntegrityError(f"files: {rel} is listed in the manifest but missing")
        if not path.is_file():
            raise IntegrityError(f"files: {rel} is not a regular file")
        return reader(path)
    except OSError as e:
        raise IntegrityError(f"files: cannot read {rel} ({e.strerror or type(e).__name__})") from None


def _sha256_of(path: Path, rel: str) -> str:
    return _read(path, rel, sha256_file)


def protection_status(manifest: Manifest) -> tuple[bool, str, str]:
    """(protected?, the word in validate's first column, the line a person reads) from the manifest's record:
    "ok" only for a protection the host measured working; "none", "weak" or "untested" otherwise."""
    p = manifest.protection
    if p is None:
        return False, "NOTE", "not stated (a schema-1 bundle)"
    if p.strength:
        ok = p.strength in ("direct-use", "resists-fine-tuning")
        return ok and p.protected, "ok" if ok else p.strength, p.summary
    return p.protected, "ok" if p.protected else "none", p.summary


def check_input_spec(manifest: Manifest, model_path: Path) -> Check:
    """The input the device feeds (manifest.input) must be the one the host measured the accuracy bounds at
    (manifest.measured_input) and the shape the ONNX graph takes; otherwise every bound is meaningless."""
    spec, measured = manifest.input, manifest.measured_input
    if measured is not None:
        for name in ("shape", "mean", "std", "scale", "normalisation", "resize", "crop"):
            if getattr(spec, name) != getattr(measured, name):
                raise IntegrityError(f"input: the device feeds {name} {getattr(spec, name)} but the host measured "
                                     f"the accuracies at {getattr(measured, name)}; rebuild the bundle")
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as e:  # onnx raises several types for a damaged file
        raise IntegrityError(f"input: cannot read {model_path.name} ({type(e).__name__})") from None
    inputs = [i for i in graph.input if i.name == spec.input_name]
    if not inputs:
        raise IntegrityError(f"input: {model_path.name} has no input named {spec.input_name!r}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is not None and d != want for d, want in zip(dims[1:], spec.shape)):
        raise IntegrityError(f"input: {model_path.name} takes {dims}, the manifest says N×{'×'.join(map(str, spec.shape))}")
    return Check("input", True, f"N×{'×'.join(map(str, spec.shape))}, mean {spec.mean}, std {spec.std}"
                                + (", as measured on the host" if measured is not None else ""))


def unlisted_files(bundle: Path, manifest: Manifest) -> list[str]:
    """Files in the bundle folder that the signed manifest does not list (nor the device wrote itself)."""
    listed = {manifest.model.path, manifest.mask.file, manifest.authorised.file,
              *(f.path for f in manifest.files), *(u.file for u in manifest.unauthorised)}
    if manifest.engine is not None:
        listed.add(manifest.engine.file)
    extra = []
    for root, dirs, files in os.walk(bundle, followlinks=False):
        rel_root = Path(root).relative_to(bundle)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if rel not in listed and rel not in SIGNED_FILES and rel not in DEVICE_FILES:
                extra.append(rel)
    return sorted(extra)


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
                  require_signature: bool = True, oms_public_key: str | Path | None = None
                  ) -> tuple[Manifest, list[Check]]:
    """Run every integrity check; raise IntegrityError (exit 1) or BundleError (exit 2) on the first failure."""
    bundle = Path(bundle)
    key = load_public_key(public_key) if public_key is not None else None
    manifest, _ = read_manifest(bundle, key, require_signature=require_signature)  # authenticated, then parsed
    checks: list[Check] = [Check("signature", True, "manifest.sig verifies (Ed25519)" if key is not None
                                 else "not checked (--allow-unsigned)")]

    for entry in [manifest.model, *manifest.files]:
        digest = _sha256_of(_inside(bundle, entry.path), entry.path)
        if digest != entry.sha256:
            raise IntegrityError(f"files: sha256 of {entry.path} does not match the manifest (file {digest[:16]}…, "
                                 f"manifest {entry.sha256[:16]}…): the file was modified")
    for check in [manifest.authorised, *manifest.unauthorised]:
        if _sha256_of(_inside(bundle, check.file), check.file) != check.sha256:
            raise IntegrityError(f"files: validation set {check.file} was modified")
    try:
        extra = unlisted_files(bundle, manifest)
    except OSError as e:
        raise IntegrityError(f"files: cannot list the bundle ({e.strerror})") from None
    if extra:
        raise IntegrityError(f"files: {len(extra)} file(s) the signed manifest does not list, first {extra[0]!r}; "
                             "a bundle carries nothing else (remove it, or rebuild the bundle)")
    checks.append(Check("files", True, f"{1 + len(manifest.files)} files match their sha256; nothing unlisted"))
    if oms_public_key is not None:
        from .oms import verify as verify_oms

        checks.append(Check("oms", True, verify_oms(bundle, oms_public_key)))

    bits = _read(_inside(bundle, manifest.mask.file), manifest.mask.file, Path.read_bytes)
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
    checks.append(check_input_spec(manifest, _inside(bundle, manifest.model.path)))

    if engine is not None:
        checks.append(check_engine(Path(engine), manifest))
    return manifest, checks


def check_engine(engine: Path, manifest: Manifest) -> Check:
    """An engine file must exist, be non-trivial, and (where TensorRT is here) match its version and GPU."""
    from .backends import tensorrt_backend

    if not engine.is_file():
        raise BundleError(f"{engine}: engine file not found" if not engine.exists() else f"{engine}: not a file")
    size = engine.stat().st_size
    if size < 1024:
        raise IntegrityError(f"engine: {engine} is only {size} bytes: truncated")
    if not tensorrt_backend.is_available():  # an engine nobody here can load proves nothing: never a pass
        raise IntegrityError(f"engine: --engine {engine.name} given, but TensorRT (the tensorrt Python package, "
                             "cuda-python and a CUDA GPU) cannot load here; validate without --engine to check "
                             "the ONNX model, or install TensorRT")
    info = manifest.engine
    if info is not None and engine.name == Path(info.file).name and sha256_file(engine) != info.sha256:
        raise IntegrityError(f"engine: sha256 of {engine.name} does not match the manifest")
    ver = tensorrt_backend.trt_version()
    want_ver = (info.tensorrt_version if info else None) or manifest.target.tensorrt_version
    if ver and want_ver and ver.split(".")[:2] != str(want_ver).split(".")[:2]:
        raise IntegrityError(f"engine: built for TensorRT {want_ver}, this device has {ver}; rebuild with "
                             "build_engine.sh")
    cc = tensorrt_backend.device_compute_capability()
    want_cc = (info.compute_capability if info else None) or manifest.target.compute_capability
    if cc and want_cc and cc != want_cc:
        raise IntegrityError(f"engine: built for compute capability {want_cc}, this GPU is {cc}; rebuild with "
                             "build_engine.sh")
    return Check("engine", True, f"{engine.name}: {size:,} bytes, TensorRT {ver}, GPU {cc or 'unknown'}")
