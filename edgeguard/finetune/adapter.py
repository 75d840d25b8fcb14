"""The input-space attacker's model: a small input adapter in front of the frozen protected model (model
reprogramming / visual prompting). Only the adapter trains; the weights, their mask and BatchNorm statistics
stay exactly as shipped, so what it measures is the protected model's direct use under attack."""
from __future__ import annotations

import torch
from torch import nn

from ..models.registry import input_of


class InputAdapter(nn.Module):
    """x ↦ colour(x) + residual(x) + pattern: a per-pixel colour map (the identity at start), a small
    convolutional residual (zero at start) and a learned additive pattern (zero at start), so an untrained
    adapter passes the input through unchanged."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 16):
        super().__init__()
        self.colour = nn.Conv2d(channels, channels, 1)
        self.residual = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, channels, 3, padding=1))
        self.pattern = nn.Parameter(torch.zeros(1, channels, height, width))
        with torch.no_grad():
            self.colour.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.colour.bias.zero_()
            self.residual[2].weight.zero_()
            self.residual[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour(x) + self.residual(x) + self.pattern


class Adapted(nn.Module):
    """adapter → frozen model; carries the model's input so every loop normalises as the model expects."""

    def __init__(self, model: nn.Module, adapter: InputAdapter):
        super().__init__()
        self.adapter = adapter
        self.model = model
        self.input_spec = input_of(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapter(x))

    def train(self, mode: bool = True) -> Adapted:
        """Only the adapter ever trains: the protected model keeps its shipped BatchNorm statistics."""
        self.training = mode
        self.adapter.train(mode)
        self.model.eval()
        return self


def adapt(model: nn.Module, seed: int) -> Adapted:
    """The frozen `model` behind a fresh input adapter sized for its input, seeded."""
    spec = input_of(model)
    c, h, w = spec.shape
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = InputAdapter(c, h, w).to(device)
    return Adapted(model, adapter)


def unwrap(model: nn.Module) -> nn.Module:
    """The classifier inside an adapted model (the model itself otherwise)."""
    return model.model if isinstance(model, Adapted) else model
