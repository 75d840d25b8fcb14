"""BatchNorm statistics, below methods and evaluation alike: their re-estimation (the attacker's move, the
hardening's and NTP's recalibration before shipping), the shift a mask causes carried over from a pseudo-source
(MAP without source data), and how far a batch's per-layer statistics are from a model's running ones
(DeepInversion's prior, the pseudo-source fidelity check)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .models.registry import input_of
from .training import TensorData, normalize


def _tracked(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (any dimension) that keeps running statistics: what re-estimation changes."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]


class BNStatHook:
    """Collects, per BN layer, the distance of the current batch's statistics from the running ones
    (the first layer's weighted by `first_weight`)."""

    def __init__(self, layers: list[nn.BatchNorm2d], first_weight: float = 1.0):
        self.losses: list[torch.Tensor] = []
        self.weights = {id(m): (first_weight if i == 0 else 1.0) for i, m in enumerate(layers)}
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        d = torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2)
        self.losses.append(self.weights[id(module)] * d)

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bn_distance(model: nn.Module, x_normalised: torch.Tensor) -> float:
    """Sum over BN layers of ‖μ_batch − μ_run‖ + ‖σ²_batch − σ²_run‖ for a batch (eval mode, no grad)."""
    layers = bn_layers(model)
    hook = BNStatHook(layers)
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x_normalised)
        model.train(was)
        return float(hook.pop())
    finally:
        hook.close()


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: TensorData, batch_size: int = 128, max_batches: int | None = None,
                  shuffle_seed: int | None = None) -> None:
    """Replace every BatchNorm's running statistics by their cumulative average over train-mode forward passes
    on `data` (uint8 images; no gradient), in order or shuffled by `shuffle_seed`, at most `max_batches`
    batches; a one-image batch is skipped (its variance is undefined). The model's mode is restored."""
    bns = _tracked(model)
    if not bns or len(data) == 0:
        return
    device = next(model.parameters()).device
    spec = input_of(model)
    was = model.training
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the passes
    model.train()
    order = None
    if shuffle_seed is not None:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(shuffle_seed))
    for i, start in enumerate(range(0, len(data), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        xb = data.x[start : start + batch_size] if order is None else data.x[order[start : start + batch_size]
                                                                                .to(data.x.device)]
        if len(xb) > 1:
            model(normalize(xb.to(device), spec))
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    model.train(was)


def reestimated_copy(model: nn.Module, data: TensorData) -> nn.Module:
    """A copy of `model` with its BatchNorm statistics re-estimated on `data` (the model is left as it is)."""
    out = copy.deepcopy(model)
    reestimate_bn(out, data)
    return out


@torch.no_grad()
def carry_bn_shift(model: nn.Module, reference: nn.Module, data: TensorData,
                   reference_on_data: nn.Module | None = None) -> None:
    """Move `model`'s BatchNorm statistics by the shift that `data` shows between it and `reference` (the same
    architecture): both are re-estimated on `data` (copies) and `model` takes the difference of the means and
    the ratio of the variances. A change of the weights (a mask) moves the statistics, and images that only
    approximate the real ones (a pseudo-source) see that move while their own mismatch cancels; replacing the
    statistics by the pseudo-source's own imports that mismatch (RESULTS, "the mask moves the BatchNorm statistics").
    `reference_on_data`: `reestimated_copy(reference, data)` made once by a caller that carries many masks."""
    if len(data) == 0:  # no images, no measured shift (reestimate_bn would leave the copies as they are)
        return
    moved = reestimated_copy(model, data)
    ref = reference_on_data if reference_on_data is not None else reestimated_copy(reference, data)
    for out, m, r in zip(_tracked(model), _tracked(moved), _tracked(ref)):  # the layers reestimate_bn changed
        out.running_mean.add_(m.running_mean - r.running_mean)
        out.running_var.mul_(m.running_var / r.running_var.clamp_min(1e-5))
