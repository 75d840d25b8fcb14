"""Device choice (`auto|cpu|cuda`) and autocast policy, in one place."""
from __future__ import annotations

import contextlib

import torch

from .errors import EdgeguardError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EdgeguardError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise EdgeguardError(f"--device must be auto, cpu or cuda[:N], got {name!r}")


def autocast(device: torch.device, enabled: bool = True, cpu: bool = False):
    """bf16 autocast on CUDA (no loss scaling needed); on CPU only when asked (`cpu`): the attack engine asks,
    methods and source training stay fp32 there."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_bf16(precision: str, device) -> bool:
    """Whether fine-tuning runs (attacks, simulated attacks) autocast to bf16 on this CPU: `auto` where the CPU
    has native bf16 (CUDA always autocasts unless fp32 is asked for)."""
    if precision == "fp32" or resolve_device(device).type != "cpu":
        return False
    return precision == "bf16" or bool(torch.backends.mkldnn.is_available()
                                       and torch.ops.mkldnn._is_mkldnn_bf16_supported())
