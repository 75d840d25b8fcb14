"""Finished pre phases (a distilled student, a SHOT-adapted model, a restyled adapter) kept by what they were
made from, so each is computed once per model and seed: across ratios, across the worker processes of one
evaluation (an exclusive file lock per phase: a second worker waits for the first instead of redoing it), and
across evaluations and crashes (safetensors files in a folder, written atomically). A phase depends on the
model's weights and mask, the unlabelled images, the seed and the phase's own settings, and on nothing a ratio
changes; its key is the SHA-256 of all of them."""
from __future__ import annotations

import hashlib
import json
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.fileio import atomic_path, atomic_write_text

from ..masks import MaskSet
from ..training import TensorData

State = dict[str, torch.Tensor]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


class PhaseStore:
    """Phase results by key, in memory and (with a folder) on disk; `get(parts, make)` returns the stored state
    or runs `make` once and stores what it returns."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._states: dict[str, State] = {}
        self._digests: dict[int, tuple[weakref.ref, str]] = {}  # id → (a weak reference: the id is still its own)

    def _digest(self, part) -> str:
        """A stable digest of one key part: tensors by their bytes, modules by their state, masks, data by images."""
        if isinstance(part, (str, int, float, bool)) or part is None:
            return repr(part)
        if isinstance(part, TensorData):
            part = part.x
        memo = self._digests.get(id(part))
        if memo is not None and memo[0]() is part:
            return memo[1]
        h = hashlib.sha256()
        if isinstance(part, torch.Tensor):
            items = [("", part)]
        elif isinstance(part, nn.Module):
            items = sorted(part.state_dict().items())
        elif isinstance(part, MaskSet):
            items = sorted(part.masks.items())
        else:
            raise TypeError(f"cannot key a phase by {type(part).__name__}")
        for name, t in items:
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(_tensor_bytes(t))
        self._digests[id(part)] = (weakref.ref(part), h.hexdigest())
        return h.hexdigest()

    def key(self, parts: tuple) -> str:
        h = hashlib.sha256(torch.__version__.encode())
        for p in parts:
            h.update(self._digest(p).encode() + b"\0")
        return h.hexdigest()[:32]

    def get(self, parts: tuple, make: Callable[[], State]) -> State:
        """The state stored under `parts`, else `make()`'s (stored; with its wall seconds beside it on disk)."""
        key = self.key(parts)
        if key in self._states:
            return self._states[key]
        if self.folder is None:
            state = self._states[key] = {k: v.detach().clone() for k, v in make().items()}
            return state
        path = self.folder / f"{key}.safetensors"
        with _locked(self.folder / f"{key}.lock"):
            state = _load(path)
            if state is None:
                t = time.perf_counter()
                state = {k: v.detach().cpu().contiguous().clone() for k, v in make().items()}
                with atomic_path(path) as tmp:
                    save_file(state, str(tmp))
                atomic_write_text(path.with_suffix(".json"), json.dumps(
                    {"parts": [p if isinstance(p, (str, int, float, bool)) or p is None else type(p).__name__
                               for p in parts], "seconds": round(time.perf_counter() - t, 2)}))
        self._states[key] = state
        return state


def _load(path: Path) -> State | None:
    """A stored phase, or None when it is not there or cannot be read (a file cut by a crash is redone)."""
    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - safetensors raises its own errors for a damaged file; redo the phase
        path.unlink(missing_ok=True)
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (waits for another process that holds it); no lock where fcntl is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: phases may be computed twice, never read half-written (atomic writes)
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
