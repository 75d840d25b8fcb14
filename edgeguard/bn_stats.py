"""BatchNorm feature statistics: how far a batch's per-layer statistics are from a model's running ones.
DeepInversion's prior (methods/synthesis.py) and the pseudo-source fidelity check (evaluation/fidelity.py)
both measure it, so it lives below both."""
from __future__ import annotations

import torch
from torch import nn


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
