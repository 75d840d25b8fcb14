"""Deployment target profiles: precision, GPU, workspace, DLA and the TensorRT/JetPack versions expected."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # onnxruntime | tensorrt
    precision: str  # default precision
    compute_capability: str | None  # None: whatever GPU builds it
    tensorrt_version: str | None
    jetpack: str | None
    workspace_mb: int
    dla: bool


TARGETS = {
    "onnx": Target("onnx", "onnxruntime", "fp32", None, None, None, 0, False),
    "cpu": Target("cpu", "onnxruntime", "fp32", None, None, None, 0, False),
    "tensorrt": Target("tensorrt", "tensorrt", "fp16", None, None, None, 2048, False),
    # JetPack 6.x ships TensorRT 10.3; Orin is compute capability 8.7 (with DLA cores on AGX/NX).
    "jetson-orin": Target("jetson-orin", "tensorrt", "fp16", "8.7", "10.3", "6.x", 1024, False),
    # JetPack 5.x ships TensorRT 8.5/8.6; Xavier is compute capability 7.2.
    "jetson-xavier": Target("jetson-xavier", "tensorrt", "fp16", "7.2", "8.5", "5.x", 1024, False),
}
ALIASES = {"jetson": "jetson-orin"}


def get_target(name: str) -> Target:
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(sorted([*TARGETS, *ALIASES]))}")
    return TARGETS[key]
