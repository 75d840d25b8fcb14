"""Baselines: magnitude pruning, the reference point every protection method must beat (it needs no data).

It keeps the largest-magnitude weights and protects nothing on purpose: a model pruned this way fine-tunes
on the target as well as the source model does. Tests and benchmarks use it as a cheap "masked model".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import param
from ..errors import EdgeguardError
from ..masks import MaskSet, prunable_names
from .base import Checkpoints, DataNeeds, MethodResult, ProtectionData, register_method


@dataclass
class MagnitudeConfig:
    sparsity: float = param(0.5, "fraction of the masked weights pruned (smallest |w| first)")
    budget: str = param("global", "one threshold over all layers, or the same fraction in each layer",
                          choices=("global", "layer"))
    layers: str = param("all", "which layers are masked", choices=("all", "encoder", "head"))
    keep_first: bool = param(True, "keep the first conv dense (small nets are too sensitive there)")
    seed: int = param(0, "unused (magnitude pruning is deterministic); kept for the method contract")

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise EdgeguardError(f"sparsity must be in (0, 1), got {self.sparsity}")


def magnitude_mask(model: nn.Module, cfg: MagnitudeConfig) -> MaskSet:
    params = dict(model.named_parameters())
    names = prunable_names(model, cfg.layers)
    mask = MaskSet.ones(model, names)
    pruned = names[1:] if cfg.keep_first and cfg.layers != "head" else names
    if not pruned:
        raise EdgeguardError("nothing to prune: the only masked layer is the first conv (set keep_first=false)")
    mags = {n: params[n].detach().abs() for n in pruned}
    if cfg.budget == "global":
        flat = torch.cat([m.flatten() for m in mags.values()])
        thr = flat.kthvalue(max(1, int(cfg.sparsity * flat.numel()))).values
        for n in pruned:
            mask.masks[n] &= mags[n] > thr
    else:
        for n in pruned:
            mask.masks[n] &= mags[n] > torch.quantile(mags[n].flatten().float(), cfg.sparsity)
    return mask


def run_magnitude(model: nn.Module, data: ProtectionData, cfg: MagnitudeConfig,
                  checkpoints: Checkpoints) -> MethodResult:
    mask = magnitude_mask(model, cfg)
    out = copy.deepcopy(model)
    mask.to(data.device).bake_(out)
    kept, total = mask.counts()
    return MethodResult(out, mask.cpu(), [{"sparsity": 1 - kept / total}])


METHOD = register_method("magnitude", "baseline: prune the smallest-magnitude weights (needs no data, protects "
                         "nothing)", MagnitudeConfig, lambda cfg: DataNeeds(), run_magnitude)
