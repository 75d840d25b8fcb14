"""The attacker's moves on a starting copy: a re-initialised head, regrown pruned weights. The evaluation's
attacks and the hardening's simulated attacks use these same functions."""
from __future__ import annotations

import torch
from torch import nn

from ..masks import MaskSet


def reinit_head(model: nn.Module, seed: int) -> None:
    """Re-initialise the head from `seed` (the global RNG is left as it was): the attacker's new head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


@torch.no_grad()
def regrow_(model: nn.Module, mask: MaskSet, seed: int, scale: float = 0.1) -> None:
    """Give every pruned weight a small random value (N(0, (scale · std of the tensor's kept weights)²)), so a
    pruned unit gets gradient again; seeded, so the same run regrows the same values."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed * 7 + 104729)
    for name in sorted(mask.masks):
        p, keep = params[name], mask.masks[name].to(params[name].device)
        kept = p[keep]
        std = float(kept.std()) if kept.numel() > 1 else 0.01
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale * max(std, 1e-3)
        p.copy_(torch.where(keep, p, noise))
