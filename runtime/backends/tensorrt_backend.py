"""TensorRT: deserialise an engine and run it with the tensor-address API (`execute_async_v3`).

Written against the documented TensorRT 10.x (JetPack 6) and 11.x Python API; NOT RUN in this project's CI
or on its development machines (TensorRT cannot be installed there). Device memory goes through
cuda-python's runtime (`cuda.bindings.runtime`, or the older `cuda.cudart`), imported only here: one stream,
buffers allocated once per input shape and reused (a latency loop allocates nothing).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..manifest import BundleError, IntegrityError


def is_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and _cudart() is not None


def _cudart():
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return __import__(mod, fromlist=["cudaMalloc"])
        except ImportError:
            continue
    return None


def trt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt as trt

    return trt.__version__


def device_compute_capability() -> str | None:
    rt = _cudart()
    if rt is None:
        return None
    err, props = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    return f"{props.major}.{props.minor}"


def _check(err_and_value):
    err, *rest = err_and_value if isinstance(err_and_value, tuple) else (err_and_value,)
    if int(err) != 0:
        raise BundleError(f"CUDA error {int(err)}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine_path: Path, input_name: str = "input", output_name: str = "logits"):
        import tensorrt as trt

        self.trt = trt
        self.rt = _cudart()
        data = Path(engine_path).read_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise IntegrityError(f"engine: {engine_path} could not be deserialised (truncated, or built for another "
                                 "TensorRT version or GPU); rebuild it with build_engine.sh on this device")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        self._bufs: dict[tuple[int, ...], tuple[int, int, tuple[int, ...]]] = {}
        self.stream = _check(self.rt.cudaStreamCreate())

    def _buffers(self, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        """Device buffers for one input shape, allocated once and reused by every later run of that shape."""
        if shape not in self._bufs:
            self.context.set_input_shape(self.input_name, shape)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            n_in = int(np.prod(shape)) * 4
            n_out = int(np.prod(out_shape)) * 4
            d_in = _check(self.rt.cudaMalloc(n_in))
            d_out = _check(self.rt.cudaMalloc(n_out))
            self._bufs[shape] = (int(d_in), int(d_out), out_shape)
        return self._bufs[shape]

    def run(self, x: np.ndarray) -> np.ndarray:
        rt = self.rt
        x = np.ascontiguousarray(x, np.float32)
        d_in, d_out, out_shape = self._buffers(tuple(x.shape))
        self.context.set_input_shape(self.input_name, x.shape)
        out = np.empty(out_shape, np.float32)
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(rt.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self.stream))
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        if not self.context.execute_async_v3(int(self.stream)):
            raise BundleError("TensorRT execute_async_v3 failed")
        _check(rt.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self.stream))
        _check(rt.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        """Free the device buffers and the stream (also at garbage collection)."""
        for d_in, d_out, _ in self._bufs.values():
            self.rt.cudaFree(d_in)
            self.rt.cudaFree(d_out)
        self._bufs.clear()
        if getattr(self, "stream", None) is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown: CUDA may already be gone
            pass

    def describe(self) -> dict:
        return {"backend": self.name, "version": self.trt.__version__,
                "compute_capability": device_compute_capability()}
