"""The attacker's moves on a starting copy, one definition each: a re-initialised head, regrown pruned
weights, the top layers re-initialised, shrink-and-perturb, BatchNorm statistics re-estimated on the
attacker's data, and `attack_start`, which applies what a recipe asks for. The evaluation's attacks and the
hardening's simulated attacks both start here."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..bn_stats import reestimate_bn
from ..masks import MaskSet
from ..training import TensorData
from .recipe import AttackRecipe

HEAD_SEED_OFFSET = 7919  # the new head's seed is the run's seed + this (the regrown weights use the seed itself)
REINIT_SEED_OFFSET = 15485863  # the re-initialised top layers'
PERTURB_SEED_OFFSET = 32452843  # shrink-and-perturb's fresh init


def reinit_head(model: nn.Module, seed: int) -> None:
    """Re-initialise the head from `seed` (the global RNG is left as it was): the attacker's new head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that hold weights and can re-initialise themselves, in definition order (input to output
    for the registry's and torchvision's architectures)."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]


def reinit_top_(model: nn.Module, share: float, seed: int) -> list[str]:
    """Re-initialise the top `share` of the weight layers (at least one), seeded; returns the parameter names
    that are now the attacker's own (their mask no longer applies)."""
    found = layers(model)
    k = max(1, math.ceil(share * len(found)))
    fresh = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, m in found[len(found) - k:]:
            m.reset_parameters()
            fresh += [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
    return fresh


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture from a seeded fresh init, trainable (shrink-and-perturb's noise, the distilled
    student)."""
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.requires_grad_(True)
    reinit_top_(fresh, 1.0, seed)
    return fresh


@torch.no_grad()
def shrink_perturb_(model: nn.Module, shrink: float, perturb: float, seed: int) -> None:
    """Shrink-and-perturb (Ash & Adams): θ ← shrink·θ + perturb·θ_fresh, θ_fresh a seeded fresh init of the
    same architecture (so the noise has each layer's own scale); BatchNorm statistics are left as they were."""
    new = dict(fresh_copy(model, seed).named_parameters())
    for name, p in model.named_parameters():
        p.mul_(shrink).add_(new[name].to(p.device, p.dtype), alpha=perturb)


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
    """The attacker's starting copy (head or top layers re-initialised, pruned weights regrown, shrunk and
    perturbed, as the recipe says) and the mask it keeps (None: pruned weights train freely; re-initialised
    weights are the attacker's own, so their mask is dropped)."""
    m = copy.deepcopy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(True)
    top = set(reinit_top_(m, recipe.reinit, seed + REINIT_SEED_OFFSET)) if recipe.reinit else set()
    if recipe.head == "reinit":
        reinit_head(m, seed + HEAD_SEED_OFFSET)
    head = {f"head.{n}" for n, _ in m.head.named_parameters()} if recipe.head == "reinit" else set()
    use_mask = None
    if mask is not None and recipe.pruned == "masked":
        use_mask = MaskSet({k: v for k, v in mask.masks.items() if k not in top | head}).to(device)
    elif mask is not None and recipe.pruned == "regrow":
        regrow_(m, MaskSet({k: v for k, v in mask.masks.items() if k not in top}), seed)
    if recipe.shrink != 1 or recipe.perturb:
        shrink_perturb_(m, recipe.shrink, recipe.perturb, seed + PERTURB_SEED_OFFSET)
    return m, use_mask


def bn_move(model: nn.Module, recipe: AttackRecipe, data: TensorData) -> None:
    """The BN attacker's move, last before fine-tuning: statistics re-estimated on its own subset."""
    if recipe.bn == "reestimate":
        reestimate_bn(model, data, recipe.batch_size)
