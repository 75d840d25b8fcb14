"""The binary mask: the one module every method, attack and converter uses.

A `MaskSet` maps parameter names (as in `model.named_parameters()`) to bool tensors of the same shape;
True keeps a weight, False prunes it. A fixed mask is applied in place: baked (`weight *= mask`, for
shipping), and while training by masking gradients before each optimiser step (`mask_grads_`) and
re-zeroing after it (`zero_masked_`). No parametrization is left in the model, so an exported graph never
carries the dense weights. Functional code (a learned mask, a differentiable simulated attack) uses
`masked_params` / `MaskSet.masks` with `torch.func.functional_call`.
The packed-bit format itself lives in `runtime.maskbits`, shared with the device.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from runtime import maskbits

from .errors import CheckFailed, EdgeguardError

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def prunable_names(model: nn.Module, scope: str = "all") -> list[str]:
    """Names of conv and linear weights; scope `all`, `encoder` (NTP prunes the encoder) or `head`."""
    if scope not in ("all", "encoder", "head"):
        raise EdgeguardError(f"mask scope must be all, encoder or head, got {scope!r}")
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, PRUNABLE_TYPES):
            full = f"{mod_name}.weight" if mod_name else "weight"
            if scope == "all" or full.startswith(scope + "."):
                names.append(full)
    return names


@dataclass
class MaskSet:
    """name → bool tensor (True = kept). Shapes match the parameters they mask."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def ones(cls, model: nn.Module, names: Iterable[str] | None = None) -> MaskSet:
        params = dict(model.named_parameters())
        names = list(names) if names is not None else prunable_names(model)
        missing = [n for n in names if n not in params]
        if missing:
            raise EdgeguardError(f"no parameter named {missing[0]!r} in the model")
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in names})

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self):
        return iter(sorted(self.masks))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def to(self, device: torch.device | str) -> MaskSet:
        return MaskSet({k: v.to(device) for k, v in self.masks.items()})

    def cpu(self) -> MaskSet:
        return self.to("cpu")

    # --- counting -------------------------------------------------------------------------------------------
    def sparsity_per_layer(self) -> dict[str, float]:
        return {k: 1.0 - float(v.float().mean()) if v.numel() else 0.0 for k, v in sorted(self.masks.items())}

    def sparsity(self) -> float:
        total = sum(v.numel() for v in self.masks.values())
        kept = sum(int(v.sum()) for v in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def counts(self) -> tuple[int, int]:
        """(kept, total) over every masked tensor."""
        return (sum(int(v.sum()) for v in self.masks.values()), sum(v.numel() for v in self.masks.values()))

    # --- applying -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bake_(self, model: nn.Module) -> nn.Module:
        """weight *= mask, in place: masked entries become exactly 0 (the shipped form)."""
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            if name not in params:
                raise EdgeguardError(f"mask names {name!r} but the model has no such parameter")
            p = params[name]
            if p.shape != m.shape:
                raise EdgeguardError(f"mask {name!r} has shape {tuple(m.shape)}, the weight {tuple(p.shape)}")
            p.mul_(m.to(device=p.device, dtype=p.dtype))
        return model

    zero_masked_ = bake_  # after an optimiser step: re-zero what the mask prunes (fixed-mask training)

    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights, so optimiser state never builds up there."""
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            g = params[name].grad
            if g is not None:
                g.mul_(m.to(device=g.device, dtype=g.dtype))

    def violations(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Masked entries that are not exactly 0, per tensor (empty = the mask holds)."""
        return maskbits.zero_violations(self.numpy(), {k: v.detach().cpu().float().numpy()
                                                       for k, v in state.items() if k in self.masks})

    def verify(self, state: Mapping[str, torch.Tensor], where: str = "model") -> None:
        bad = self.violations(state)
        if bad:
            first = next(iter(bad))
            raise CheckFailed(f"{where}: {sum(max(v, 1) for v in bad.values())} masked weights are not 0 "
                              f"(first in {first!r}); the file was tampered with or the mask was not baked")

    # --- packing --------------------------------------------------------------------------------------------
    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(bool) for k, v in self.masks.items()}

    def pack(self) -> tuple[bytes, maskbits.Layout]:
        return maskbits.pack(self.numpy())

    @classmethod
    def unpack(cls, bits: bytes, layout) -> MaskSet:
        try:
            arrays = maskbits.unpack(bits, layout)
        except ValueError as e:
            raise EdgeguardError(f"packed mask does not match its layout: {e}") from None
        return cls({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})

    def sha256(self) -> str:
        return maskbits.digest(self.pack()[0])


def masked_params(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: weight · mask} for the masked parameters, differentiable in both (for `functional_call`):
    MAP's learned straight-through masks use it; a fixed mask in training uses `MaskSet` in place."""
    params = dict(model.named_parameters())
    return {n: params[n] * m for n, m in masks.items()}


def apply_n_m(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest of every m consecutive input weights (the 2:4 pattern sparse tensor cores use).

    Weights are grouped along the input dimension (dim 1 for linear, flattened in-channel×kernel for conv).
    A tensor whose input size is not a multiple of m keeps its tail group dense.
    """
    flat = scores.reshape(scores.shape[0], -1)
    cols = flat.shape[1] - flat.shape[1] % m
    keep = torch.ones_like(flat, dtype=torch.bool)
    if cols:
        groups = flat[:, :cols].reshape(flat.shape[0], -1, m)
        idx = groups.topk(n, dim=-1).indices
        g = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        keep[:, :cols] = g.reshape(flat.shape[0], cols)
    return keep.reshape(scores.shape)


def is_n_m(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every full group of m consecutive input weights keeps at most n."""
    flat = mask.reshape(mask.shape[0], -1)
    cols = flat.shape[1] - flat.shape[1] % m
    if not cols:
        return True
    return bool((flat[:, :cols].reshape(flat.shape[0], -1, m).sum(-1) <= n).all())
