"""Inference backends behind one small interface: `run(x: float32 NCHW) -> logits`.

`get_backend("auto"|"onnxruntime"|"tensorrt", ...)` picks one; TensorRT is optional and checked lazily.
"""
from __future__ import annotations

from pathlib import Path

from ..manifest import BundleError, IntegrityError
from .base import Backend


def get_backend(name: str, model_path: Path, engine_path: Path | None = None, providers: list[str] | None = None,
                input_name: str = "input", output_name: str = "logits", precision: str = "fp32") -> Backend:
    from . import onnxruntime_backend, tensorrt_backend

    if name not in ("auto", "onnxruntime", "tensorrt"):
        raise BundleError(f"--backend must be auto, onnxruntime or tensorrt, got {name!r}")
    if name == "onnxruntime" and engine_path is not None:
        raise BundleError("--engine is a TensorRT engine; drop it to run ONNX Runtime, or use --backend tensorrt")
    if name == "tensorrt" and engine_path is None:
        raise BundleError("--backend tensorrt needs --engine FILE (build it with the bundle's build_engine.sh)")
    if engine_path is not None:  # never a silent fallback from an engine to ONNX Runtime
        if not tensorrt_backend.is_available():
            raise IntegrityError("TensorRT (the tensorrt Python package, cuda-python and a CUDA GPU) cannot load "
                                 "here, so the engine cannot run; validate without --engine to run the ONNX model")
        return tensorrt_backend.TensorRTBackend(engine_path, input_name, output_name)
    return onnxruntime_backend.OnnxRuntimeBackend(model_path, providers, input_name, output_name, precision)


__all__ = ["Backend", "get_backend"]
