"""How a protection method plugs in: one registered object per method, one call that does the work.

A method is a `ProtectionMethod`: a name, a one-line summary, a config dataclass (fields made with
`edgeguard.config.param`, with a `seed` and a `validate()`), what data it needs for a given config
(`DataNeeds`), and `run(model, data, cfg, checkpoints) -> MethodResult`. The method only computes: the
pipeline in `edgeguard/protect.py` loads and checks the source model, prepares the data the method asks
for, measures accuracies before and after, writes the model file, its card and side files, and owns the
checkpoint folder a method saves into (`Checkpoints`). To add a method, write one module that calls
`register_method(...)` and import it in `methods/__init__.py`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EdgeguardError
from ..masks import MaskSet
from ..training import TensorData, write_checkpoint


@dataclass(frozen=True)
class DataNeeds:
    """Which of the defender's data a method reads. Labels it does not need are zeroed before it sees them."""

    source_images: bool = False
    source_labels: bool = False
    target_images: bool = False
    target_labels: bool = False

    def describe(self) -> str:
        parts = [name for name, on in (("source images", self.source_images), ("source labels", self.source_labels),
                                       ("target images", self.target_images), ("target labels", self.target_labels))
                 if on]
        return ", ".join(parts) or "none (the model alone)"


@dataclass
class ProtectionData:
    """What the pipeline hands a method: the training splits it asked for, on the device it runs on."""

    source: TensorData | None
    target: TensorData | None
    num_classes: int
    device: torch.device
    mask: MaskSet | None = None  # the input's mask, for a method that refines a protected model


@dataclass
class MethodResult:
    """The protected model (weights may differ from the input's), its mask, the training history, and any
    method-specific facts for the model card's protection record."""

    model: nn.Module
    mask: MaskSet
    history: list[dict]
    notes: dict = field(default_factory=dict)


class Checkpoints:
    """A folder the pipeline owns; a method saves resumable state into it by name and reads it back."""

    def __init__(self, root: Path | None, resume: bool):
        self.root = root
        self.resume = resume

    def path(self, name: str) -> Path | None:
        """Where `run_loop` may keep a per-epoch checkpoint called `name` (None: checkpointing off)."""
        if self.root is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{name}.pt"

    def save(self, name: str, payload: dict) -> None:
        path = self.path(name)
        if path is not None:
            write_checkpoint(path, payload)

    def load(self, name: str, device: torch.device | str = "cpu") -> dict | None:
        """The saved state, when resuming and it exists (tensors only: `weights_only=True`)."""
        path = self.path(name) if self.resume else None
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which and how to recover
            raise EdgeguardError(f"{path}: not a readable edgeguard checkpoint ({type(e).__name__}); "
                                 "delete it or run without --resume") from None


ConfigT = Any
RunFn = Callable[[nn.Module, ProtectionData, ConfigT, Checkpoints], MethodResult]


@dataclass(frozen=True)
class ProtectionMethod:
    name: str
    summary: str
    config_cls: type
    needs: Callable[[ConfigT], DataNeeds]
    run: RunFn
    refines: bool = False  # True: also takes a protected model (its mask stays exact) as well as a source model

    def describe_needs(self, cfg: ConfigT | None = None) -> str:
        return self.needs(cfg if cfg is not None else self.config_cls()).describe()


_METHODS: dict[str, ProtectionMethod] = {}


def register_method(name: str, summary: str, config_cls: type, needs: Callable[[ConfigT], DataNeeds],
                    run: RunFn, refines: bool = False) -> ProtectionMethod:
    """Add a method to the registry (each method module calls this once, at import)."""
    import dataclasses

    if name in _METHODS:
        raise ValueError(f"protection method {name!r} is registered twice")
    if not dataclasses.is_dataclass(config_cls) or "seed" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise TypeError(f"{name}: the config must be a dataclass with a `seed` field")
    method = ProtectionMethod(name, summary, config_cls, needs, run, refines)
    _METHODS[name] = method
    return method


def _load_builtin() -> None:
    from . import baselines, harden, map, ntp  # noqa: F401  (each registers itself)


def get_method(name: str) -> ProtectionMethod:
    _load_builtin()
    if name not in _METHODS:
        raise EdgeguardError(f"unknown protection method {name!r}; choose one of {', '.join(sorted(_METHODS))} "
                             "(`edgeguard methods` lists them)")
    return _METHODS[name]


def list_methods() -> list[ProtectionMethod]:
    _load_builtin()
    return [_METHODS[k] for k in sorted(_METHODS)]


def config_json(method: ProtectionMethod, cfg: ConfigT) -> str:
    """The `OUT.config.json` side file: enough to rerun the method (`edgeguard protect --config`)."""
    import dataclasses

    return json.dumps({"method": method.name, "config": dataclasses.asdict(cfg)}, indent=2, default=str)
