"""On-device measurements: accuracy on the bundle's validation sets, latency, and predictions for images."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .manifest import BundleError, InputSpec


def preprocess(x_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N×C×H×W → float32 as the manifest says (the graph may normalise itself: then only cast)."""
    x = x_uint8.astype(np.float32)
    if spec.normalisation == "graph":
        return x
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return (x * np.float32(spec.scale) - mean) / std


def load_validation(path: Path, spec: InputSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x (uint8 N×C×H×W, the manifest's shape) and y (N labels) from a validation .npz, checked."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise BundleError(f"{path}: not a validation .npz with x and y ({str(e).splitlines()[0][:100]})") from None
    want = tuple(spec.shape) if spec is not None else x.shape[1:]
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != want or y.shape != (x.shape[0],) \
            or y.dtype.kind not in "iu":
        raise BundleError(f"{path}: x must be uint8 N×{'×'.join(map(str, want))} and y N integer labels, got "
                          f"{x.dtype} {x.shape} and {y.dtype} {y.shape}")
    return x, y.astype(np.int64)


def accuracy(backend, x_uint8: np.ndarray, y: np.ndarray, spec: InputSpec, batch: int = 256) -> float:
    correct = 0
    for s in range(0, len(y), batch):
        logits = backend.run(preprocess(x_uint8[s : s + batch], spec))
        correct += int((logits.argmax(1) == y[s : s + batch]).sum())
    return correct / max(len(y), 1)


def latency(backend, spec: InputSpec, batch: int, iterations: int = 100, warmup: int = 10) -> dict:
    """Latency percentiles (ms) and throughput (images/s) for one batch size; warm-up runs excluded."""
    x = np.random.default_rng(0).standard_normal((batch, *spec.shape)).astype(np.float32)
    for _ in range(warmup):
        backend.run(x)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        backend.run(x)
        times.append((time.perf_counter() - t) * 1000)
    t = np.asarray(times)
    return {"batch": batch, "iterations": iterations, "p50_ms": float(np.percentile(t, 50)),
            "p95_ms": float(np.percentile(t, 95)), "p99_ms": float(np.percentile(t, 99)),
            "throughput_ips": float(batch * 1000 / t.mean())}


def load_images(paths: list[str], spec: InputSpec) -> np.ndarray:
    """Image files as the host fed the model: the one decoder (`runtime.imagefile`) with the manifest's resize
    policy, so a camera JPEG reaches the model exactly as in the host's measurements."""
    from .imagefile import ImageFileError, decode_image

    out = []
    for p in paths:
        try:
            out.append(decode_image(p, spec.shape, spec.resize, spec.crop))
        except ImageFileError as e:
            raise BundleError(str(e)) from None
    return np.stack(out)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
