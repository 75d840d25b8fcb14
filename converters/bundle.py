"""Write a deployment bundle (design §5): model.onnx, manifest.json, manifest.sig, mask.bits, validation/,
build_engine.sh, README.txt, runtime/ (the device runtime's wheel). Written into a temporary folder and renamed into place: a failed build leaves
no half bundle. The same inputs give the same model.onnx bytes and the same manifest apart from `created`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import maskbits
from runtime.fileio import current_umask, fsync_dir, sha256_file
from runtime.manifest import (
    SCHEMA_VERSION,
    DomainCheck,
    EngineSpec,
    FileEntry,
    InputSpec,
    Manifest,
    MaskSpec,
    Protection,
    SlcAucEntry,
    TargetProfile,
)

from . import onnx_export, quantize, signing, tensorrt_build
from .runtime_dist import write_wheel
from .targets import get_target


@dataclass
class DomainSamples:
    name: str
    x: np.ndarray  # uint8 N×C×H×W at the model's input size
    y: np.ndarray  # int64


@dataclass
class ModelDescription:
    """Everything the converters need besides the nn.Module (no edgeguard types)."""

    classes: list[str]
    masks: dict[str, np.ndarray]
    authorised: DomainSamples
    unauthorised: list[DomainSamples] = field(default_factory=list)
    method: str = "none"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    scale: float = 1 / 255.0
    input_shape: tuple[int, int, int] = (3, 32, 32)
    resize: str = "plain"  # how a frame reaches input_shape (runtime.imagefile)
    crop: float = 1.0
    slc_auc: dict | None = None
    strength: str = ""  # edgeguard.strength level: none | weak | untested | direct-use | resists-fine-tuning
    strength_reason: str = ""
    authorised_tolerance: float = 0.02  # the device must reach host accuracy − this
    unauthorised_margin: float = 0.05  # and stay under host accuracy + this on unauthorised samples


class BuildError(Exception):
    pass


def _normalise(x: np.ndarray, d: ModelDescription) -> np.ndarray:
    mean = np.asarray(d.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(d.std, np.float32).reshape(1, -1, 1, 1)
    return (x.astype(np.float32) * np.float32(d.scale) - mean) / std


def _ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preds = []
    for s in range(0, len(x), 256):
        preds.append(sess.run(None, {sess.get_inputs()[0].name: x[s : s + 256]})[0].argmax(1))
    p = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    return float((p == y).mean()) if len(y) else 0.0, p


def _is_24(masks: dict[str, np.ndarray]) -> bool:
    for m in masks.values():
        flat = m.reshape(m.shape[0], -1)
        cols = flat.shape[1] - flat.shape[1] % 4
        if cols == 0 or (flat[:, :cols].reshape(flat.shape[0], -1, 4).sum(-1) > 2).any():
            return False
    return bool(masks)


def _sparsity(masks: dict[str, np.ndarray]) -> float:
    total = sum(m.size for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def _npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x.astype(np.uint8), y=y.astype(np.int64))
    return buf.getvalue()


def build_bundle(model, desc: ModelDescription, out_dir: str | os.PathLike, target: str = "onnx",
                 sign_key: str | os.PathLike | None = None, precision: str | None = None,
                 build_local_engine: bool = True, runtime_wheel: bool = True,
                 oms_key: str | os.PathLike | None = None) -> dict:
    """Export, check, measure, sign and write the bundle; returns a summary. With `oms_key` (ECDSA P-256)
    the finished bundle is also signed with OpenSSF model signing (oms.sig)."""
    prof = get_target(target)
    precision = precision or prof.precision
    if precision not in ("fp32", "fp16", "int8"):
        raise BuildError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "fp16" and prof.backend == "onnxruntime":
        raise BuildError(f"--precision fp16 needs a TensorRT target; target {prof.name} runs ONNX Runtime in fp32 "
                         "(or int8)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(out_dir)
    with _build_lock(out_dir):
        _clear_leftovers(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            summary = _build_into(tmp, model, desc, prof, precision, sign_key, build_local_engine, runtime_wheel)
            if oms_key is not None:
                from .oms import sign_bundle

                try:
                    sign_bundle(tmp, oms_key)
                except ValueError as e:
                    raise BuildError(str(e)) from None
            summary["oms_signed"] = oms_key is not None
            swap_into_place(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the previous bundle
    summary["bundle"] = str(out_dir)
    return summary


def is_bundle(path: Path) -> bool:
    """An edgeguard bundle folder (what `build` may replace): a manifest.json our converters wrote."""
    try:
        m = json.loads((path / "manifest.json").read_text())
        return isinstance(m, dict) and str(m.get("producer", "")).startswith("edgeguard")
    except (OSError, ValueError):
        return False


def _refuse_foreign(out_dir: Path) -> None:
    """`--out` may be new, an empty folder, or an edgeguard bundle; never anything else (it would be lost).
    Raises ValueError (bad input), not BuildError."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"--out {out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle(out_dir):
        raise ValueError(f"--out {out_dir} is a folder with other contents, not an edgeguard bundle; refusing to "
                         "replace it (choose another --out, or empty it yourself)")


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """One build per output at a time, so leftovers found under the lock are a killed build's."""
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): builds are not serialised there
            pass
        except OSError:
            os.close(fd)
            raise ValueError(f"another build is writing {out_dir} now; wait for it to finish") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _clear_leftovers(out_dir: Path) -> None:
    """Temp folders of killed builds (`.NAME.XXXXXXXX`); a previous bundle a killed older release left only as
    `.NAME.old` is put back first."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.is_dir() and not out_dir.exists() and is_bundle(old):
        os.replace(old, out_dir)
    for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def swap_into_place(new: Path, out_dir: Path) -> None:
    """Put the finished bundle at `out_dir`: a rename when there is none yet, else one atomic exchange, so a
    kill at any moment leaves either the old or the new bundle there, never nothing. `new` then holds the
    old bundle (the caller removes it)."""
    if not out_dir.exists():
        os.replace(new, out_dir)
    elif not _rename_exchange(new, out_dir):  # no renameat2: the brief two-rename window of older releases
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(new, out_dir)
        os.replace(old, new)
    fsync_dir(out_dir.parent)


def _build_into(tmp: Path, model, desc: ModelDescription, prof, precision: str, sign_key, build_local_engine,
                runtime_wheel: bool) -> dict:
    """Every file of the bundle into `tmp`, then the manifest (and its signature) that lists them."""
    masks = {k: np.asarray(v, bool) for k, v in desc.masks.items()}
    bits, layout = maskbits.pack(masks)
    mask_sha = maskbits.digest(bits)
    (tmp / "mask.bits").write_bytes(bits)
    model_path, exported, mapping, result = _export(tmp, model, desc, masks, mask_sha, precision)
    checks = _validation_sets(tmp, model_path, desc)
    result["accuracy"] = {c.name: c.accuracy for c in checks}
    sparse_24 = _is_24(masks)
    engine_info = _engine_files(tmp, model_path, prof, precision, sparse_24, build_local_engine, desc.input_shape)
    pipeline_files = write_pipeline_configs(tmp, desc, precision, onnx_path=model_path)
    if runtime_wheel:  # the device can install the runtime from the bundle itself, offline
        write_wheel(tmp / "runtime")
    (tmp / "README.txt").write_text(_readme(tmp, prof.name, precision, desc.input_shape,
                                                 signed=sign_key is not None))
    files = _listed_files(tmp, pipeline_files, onnx_export.model_files(model_path), model_path)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        producer="edgeguard converters 0.1.0", method=desc.method, classes=list(desc.classes),
        input=InputSpec(shape=list(desc.input_shape), mean=list(desc.mean), std=list(desc.std), scale=desc.scale,
                        resize=desc.resize, crop=desc.crop),
        measured_input=InputSpec(shape=list(desc.authorised.x.shape[1:]), mean=list(desc.mean), std=list(desc.std),
                                 scale=desc.scale, resize=desc.resize, crop=desc.crop),
        model=FileEntry("model.onnx", sha256_file(model_path), model_path.stat().st_size),
        mask=MaskSpec(file="mask.bits", sha256=mask_sha, layout=[[n, list(s)] for n, s in layout],
                      initializers=mapping, sparsity=_sparsity(masks)),
        authorised=checks[0], unauthorised=checks[1:],
        target=TargetProfile(name=prof.name, backend=prof.backend, precision=precision,
                             compute_capability=prof.compute_capability, tensorrt_version=prof.tensorrt_version,
                             jetpack=prof.jetpack, workspace_mb=prof.workspace_mb, dla=prof.dla,
                             sparse_weights=sparse_24),
        files=files, engine=engine_info, opset=exported.opset,
        slc_auc={k: SlcAucEntry(float(v["slc_auc"]), str(v["target"])) for k, v in desc.slc_auc.items()}
        if desc.slc_auc else None,
        protection=protection_record(desc, _sparsity(masks)))
    raw = manifest.to_json().encode()
    (tmp / "manifest.json").write_bytes(raw)
    if sign_key is not None:
        try:
            (tmp / "manifest.sig").write_bytes(signing.sign(raw, sign_key))
        except ValueError as e:
            raise BuildError(str(e)) from None
    result.update(signed=sign_key is not None, sparse_24=sparse_24, model_bytes=model_path.stat().st_size,
                  target=prof.name, engine_built=engine_info is not None)
    return result


def _export(tmp: Path, model, desc: ModelDescription, masks: dict, mask_sha: str, precision: str):
    """model.onnx with the mask baked in (int8: QDQ-quantised from an fp32 export, which is then removed);
    returns its path, the export record, the initializer mapping and the parity / agreement numbers."""
    onnx_fp32 = tmp / ("model.onnx" if precision != "int8" else "model_fp32.onnx")
    meta = {"edgeguard_format": "1", "edgeguard_mask_sha256": mask_sha, "edgeguard_method": desc.method,
            "edgeguard_normalisation": "manifest"}
    try:
        exported = onnx_export.export_onnx(model, masks, onnx_fp32, desc.input_shape, metadata=meta)
        mapping = exported.mapping
        xa = _normalise(desc.authorised.x, desc)
        par = onnx_export.parity(model, onnx_fp32, xa[:256])
    except onnx_export.ExportError as e:
        raise BuildError(f"export: {e}") from None
    result = {"parity": par, "precision": precision, "exporter": exported.exporter,
              "exporter_fallback_reason": exported.fallback_reason}
    if precision != "int8":
        return onnx_fp32, exported, mapping, result
    model_path = tmp / "model.onnx"
    quantize.quantize_qdq(onnx_fp32, model_path, xa[:256])
    mapping = quantize.remap_initializers(model_path, mapping)
    import onnx

    qm = onnx.load(str(model_path))
    for k, v in meta.items():
        e = qm.metadata_props.add()
        e.key, e.value = k, v
    model_path.write_bytes(qm.SerializeToString())
    _, p32 = _ort_accuracy(onnx_fp32, xa, desc.authorised.y)
    _, p8 = _ort_accuracy(model_path, xa, desc.authorised.y)
    result["int8_top1_agreement"] = float((p32 == p8).mean())
    onnx_fp32.unlink()
    return model_path, exported, mapping, result


def _validation_sets(tmp: Path, model_path: Path, desc: ModelDescription) -> list[DomainCheck]:
    """validation/*.npz and each domain's accuracy through onnxruntime, with the bounds the device checks."""
    os.makedirs(tmp / "validation", exist_ok=True)
    checks = []
    for role, ds in [("authorised", desc.authorised)] + [("unauthorised", u) for u in desc.unauthorised]:
        rel = f"validation/{role}_{ds.name.replace(':', '_').replace('/', '_')}.npz"
        (tmp / rel).write_bytes(_npz_bytes(ds.x, ds.y))
        acc, _ = _ort_accuracy(model_path, _normalise(ds.x, desc), ds.y)
        checks.append(DomainCheck(
            name=ds.name, file=rel, sha256=sha256_file(tmp / rel), samples=int(len(ds.y)), accuracy=acc,
            min_accuracy=max(0.0, acc - desc.authorised_tolerance) if role == "authorised" else None,
            max_accuracy=min(1.0, acc + desc.unauthorised_margin) if role == "unauthorised" else None))
    return checks


def _engine_files(tmp: Path, model_path: Path, prof, precision: str, sparse_24: bool, build_local_engine,
                  input_shape: tuple[int, int, int]) -> EngineSpec | None:
    """build_engine.sh (the device builds its own engine, cached by runtime.engine_cache) and, where TensorRT
    is here and the target asks for it, the engine itself."""
    strongly = prof.tensorrt_version is not None and tensorrt_build.major_version(prof.tensorrt_version) >= 11
    trtexec_line = tensorrt_build.trtexec_command("model.onnx", "model.engine", precision, sparse_24,
                                                  prof.workspace_mb or 1024, prof.dla, strongly, input_shape)
    script = ["#!/bin/sh", "# Build the TensorRT engine ON THIS DEVICE (engines are tied to the GPU and the TensorRT",
              "# version). Never add --sparsity=force: it would rewrite the learned mask.",
              "# A device-level cache keyed by (model.onnx sha256, TensorRT version, compute capability, precision)",
              "# makes a re-deploy of the same model build nothing (python3 -m runtime.engine_cache).", "set -e",
              'cd "$(dirname "$0")"', 'PY="${EDGEGUARD_PYTHON:-python3}"',
              'if "$PY" -m runtime.engine_cache lookup . 2>/dev/null; then exit 0; fi',
              'TC="$("$PY" -m runtime.engine_cache timing-cache 2>/dev/null || echo timing.cache)"',
              trtexec_line.replace("--timingCacheFile=timing.cache", '--timingCacheFile="$TC"'),
              '"$PY" -m runtime.engine_cache store . 2>/dev/null || true',
              'echo "engine: model.engine; validate with: edgeguard-runtime validate . --public-key vendor.pub '
              '--engine model.engine"']
    (tmp / "build_engine.sh").write_text("\n".join(script) + "\n")
    os.chmod(tmp / "build_engine.sh", 0o755)
    if not (prof.name == "tensorrt" and build_local_engine and tensorrt_build.is_available()):
        return None
    info = tensorrt_build.build_engine(model_path, tmp / "model.engine", precision, sparse_24,
                                       prof.workspace_mb, tmp / "timing.cache")
    return EngineSpec(file="model.engine", sha256=sha256_file(tmp / "model.engine"),
                      tensorrt_version=info["tensorrt_version"])


def _listed_files(tmp: Path, pipeline_files, files_needed, model_path: Path) -> list[FileEntry]:
    """The manifest's file list: scripts, pipeline configs, the runtime wheel, external ONNX data."""
    def entry(rel: str, path: Path) -> FileEntry:
        return FileEntry(rel, sha256_file(path), path.stat().st_size)

    files = [entry("build_engine.sh", tmp / "build_engine.sh"), entry("README.txt", tmp / "README.txt")]
    files += [entry(rel, tmp / rel) for rel in pipeline_files]
    files += [entry(f"runtime/{whl.name}", whl) for whl in sorted((tmp / "runtime").glob("*.whl"))]
    files += [entry(extra.name, extra) for extra in files_needed if extra != model_path]
    return files


TRITON_MODEL = "edgeguard_classifier"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode


def _crop_note(desc: ModelDescription) -> list[str]:
    if desc.resize != "center-crop":
        return []
    c, h, w = desc.input_shape
    return [f"# NOTE: the host centre-crops each frame to aspect {w}:{h} ({desc.crop:g} of the shorter side) before "
            "scaling; nvinfer scales the whole frame.", "# Crop upstream (nvvideoconvert src-crop) to keep the "
            "host's measured accuracy."]


def write_pipeline_configs(tmp: Path, desc: ModelDescription, precision: str, onnx_path: Path) -> list[str]:
    """The files camera pipelines load, so nobody rewrites the preprocessing by hand: labels.txt, a DeepStream
    nvinfer config (y = net-scale-factor · (x − offsets) is exactly (x·scale − mean)/std when std is the same
    for every channel) and a Triton model repository entry. Returns their bundle-relative paths."""
    c, h, w = desc.input_shape
    out = ["labels.txt"]
    (tmp / "labels.txt").write_text("\n".join(desc.classes) + "\n")
    if len(set(desc.std)) == 1:  # nvinfer has one scale factor for all channels (README.txt says why not)
        ds = tmp / "deepstream"
        ds.mkdir()
        (ds / "labels.txt").write_text(";".join(desc.classes) + "\n")  # a classifier's labels: one line, ';'
        offsets = ";".join(f"{m / desc.scale:.6g}" for m in desc.mean)
        (ds / "config_infer.txt").write_text("\n".join([
            "# DeepStream Gst-nvinfer config for this bundle's classifier (generated by edgeguard build).",
            "# Preprocessing: y = net-scale-factor * (x - offsets), per channel, x in 0..255.",
            "[property]", "gpu-id=0",
            f"net-scale-factor={desc.scale / desc.std[0]:.10g}", f"offsets={offsets}",
            "model-color-format=0" if c == 3 else "model-color-format=2",
            "onnx-file=../model.onnx", "model-engine-file=../model.engine", "labelfile-path=labels.txt",
            f"infer-dims={c};{h};{w}", "batch-size=1", f"network-mode={NETWORK_MODE[precision]}",
            "network-type=1", "process-mode=1", f"num-detected-classes={len(desc.classes)}",
            "classifier-threshold=0.0", "output-blob-names=logits", "maintain-aspect-ratio=0", "gie-unique-id=1",
            *_crop_note(desc), ""]))
        out += ["deepstream/config_infer.txt", "deepstream/labels.txt"]
    tr = tmp / "triton" / TRITON_MODEL
    (tr / "1").mkdir(parents=True)
    shutil.copyfile(onnx_path, tr / "1" / "model.onnx")
    (tr / "labels.txt").write_text("\n".join(desc.classes) + "\n")
    mean = ", ".join(f"{m:g}" for m in desc.mean)
    std = ", ".join(f"{v:g}" for v in desc.std)
    (tr / "config.pbtxt").write_text("\n".join([
        "# Triton model configuration (generated by edgeguard build). The client normalises the input:",
        f"# float32 NCHW, x * {desc.scale:.10g} then (x - [{mean}]) / [{std}] per channel.",
        f'name: "{TRITON_MODEL}"', 'platform: "onnxruntime_onnx"', "max_batch_size: 256",
        "input [", "  {", '    name: "input"', "    data_type: TYPE_FP32", f"    dims: [ {c}, {h}, {w} ]", "  }", "]",
        "output [", "  {", '    name: "logits"', "    data_type: TYPE_FP32", f"    dims: [ {len(desc.classes)} ]",
        '    label_filename: "labels.txt"', "  }", "]", ""]))
    out += [f"triton/{TRITON_MODEL}/config.pbtxt", f"triton/{TRITON_MODEL}/labels.txt",
            f"triton/{TRITON_MODEL}/1/model.onnx"]
    return out


def protection_record(desc: ModelDescription, sparsity: float) -> Protection:
    """What the manifest says about the protection (the device prints it before anything else): the host's
    verdict (`edgeguard.strength`) first, then the method, its sparsity and any attached SLC-AUC."""
    if desc.method in ("none", "") or not desc.masks and desc.strength in ("", "none"):
        return Protection(False, "none", "none: this model is not protected (no protection method was applied)",
                          strength="none")
    pruned = f"{sparsity * 100:.1f} % of the masked layers' weights pruned"
    if desc.strength:  # the reason already quotes the attached report's highest SLC-AUC
        line = f"{desc.strength}: {desc.strength_reason} | {pruned}"
    elif desc.slc_auc:
        line = f"{desc.method}: {pruned}; SLC-AUC " + ", ".join(
            f"{k} {v['slc_auc']:+.2f} on {v['target']}" for k, v in desc.slc_auc.items())
    else:
        line = f"{desc.method}: {pruned}"
    if not desc.slc_auc:
        line += "; no fine-tuning evaluation attached (build --report)"
    protected = desc.strength in ("", "direct-use", "resists-fine-tuning")
    return Protection(protected, desc.method, line, strength=desc.strength)


_README_ENTRIES = [  # (file or folder in the bundle, what it is); README.txt lists those the bundle holds
    ("model.onnx", "the protected classifier, mask baked in (pruned weights are exactly 0)"),
    ("manifest.json", "what the device checks: hashes, mask layout, input normalisation, accuracy bounds"),
    ("manifest.sig", "Ed25519 signature of manifest.json (verify with the vendor's public key)"),
    ("mask.bits", "the packed binary mask: every masked weight must still be 0"),
    ("validation/", "authorised and unauthorised samples (.npz: x uint8 N×{shape}, y int64)"),
    ("build_engine.sh", "builds the TensorRT engine on this device (trtexec)"),
    ("README.txt", "this file"),
    ("model.engine", "the TensorRT engine built on the host (only valid on the same GPU and TensorRT version)"),
    ("runtime/", "the edgeguard-runtime wheel (pure Python, no PyTorch). Install it with the ONNX Runtime your\n"
                 "                 device needs: pip install \"$(ls runtime/*.whl)[cpu]\" on a CPU, [gpu] on a desktop NVIDIA\n"
                 "                 GPU; on a Jetson install NVIDIA's onnxruntime-gpu wheel for its JetPack first, then the plain\n"
                 "                 wheel (pip install runtime/*.whl), which never replaces it; add [tensorrt] for cuda-python"),
    ("labels.txt", "the class names, one per line"),
    ("deepstream/", "config_infer.txt (Gst-nvinfer: preprocessing, model, engine, labels) and labels.txt"),
    ("triton/", "a Triton model repository entry (config.pbtxt, labels.txt, 1/model.onnx; for a TensorRT\n"
                "                 engine put model.plan in 1/ and set platform: \"tensorrt_plan\")"),
]


def _readme(tmp: Path, target: str, precision: str, input_shape, signed: bool) -> str:
    """README.txt: the files this bundle holds (itself, manifest.json and manifest.sig are written after it) and the
    commands to run on the device. A file the build left out (a DeepStream config nvinfer cannot express,
    say) is not listed."""
    after = {"README.txt", "manifest.json", "manifest.sig"} if signed else {"README.txt", "manifest.json"}
    shape = "×".join(map(str, input_shape))
    lines = [f"edgeguard deployment bundle (target {target}, precision {precision})", ""]
    for name, what in _README_ENTRIES:
        if name in after or (tmp / name.rstrip("/")).exists():
            lines.append(f"{name:<16} {what.format(shape=shape)}")
    if not (tmp / "deepstream").exists():
        lines.append("(no deepstream/: Gst-nvinfer has one scale factor for all channels and this model's std "
                     "differs per channel)")
    return "\n".join(lines) + """

On the device:
  sh build_engine.sh                     # only where TensorRT is installed
  edgeguard-runtime validate . --public-key vendor.pub [--engine model.engine]
"""
