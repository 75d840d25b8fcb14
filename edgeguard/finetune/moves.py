"""The attacker's moves on a starting copy, one definition each: a re-initialised head, regrown pruned
weights, BatchNorm statistics re-estimated on the attacker's data, and `attack_start`, which applies what a
recipe asks for. The evaluation's attacks and the hardening's simulated attacks both start here."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bn_stats import reestimate_bn
from ..masks import MaskSet
from ..training import TensorData
from .recipe import AttackRecipe

HEAD_SEED_OFFSET = 7919  # the new head's seed is the run's seed + this (the regrown weights use the seed itself)


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


def attack_start(model: nn.Module, mask: MaskSet | None, recipe: AttackRecipe, seed: int, device: torch.device
                 ) -> tuple[nn.Module, MaskSet | None]:
    """The attacker's starting copy (head re-initialised, pruned weights regrown if the recipe says so) and the
    mask it keeps (None: pruned weights train freely; a new head is the attacker's own, so its mask is
    dropped)."""
    m = copy.deepcopy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(True)
    if recipe.head == "reinit":
        reinit_head(m, seed + HEAD_SEED_OFFSET)
    use_mask = None
    if mask is not None and recipe.pruned == "masked":
        keep = {k: v for k, v in mask.masks.items() if not (recipe.head == "reinit" and k.startswith("head."))}
        use_mask = MaskSet(keep).to(device)
    elif mask is not None and recipe.pruned == "regrow":
        regrow_(m, mask, seed)
    return m, use_mask


def bn_move(model: nn.Module, recipe: AttackRecipe, data: TensorData) -> None:
    """The BN attacker's move, last before fine-tuning: statistics re-estimated on its own subset."""
    if recipe.bn == "reestimate":
        reestimate_bn(model, data, recipe.batch_size)
