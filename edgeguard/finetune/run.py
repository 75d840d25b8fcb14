"""One fine-tuning run: its start, subset, recipe and mask (`StackRun`), trained on its own through the one
training loop (`train_run`). The stacked engine trains many such runs at once on the same trajectories; the
hardening runs its simulated attacks through `train_run` too, observing the weights between steps."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..devices import resolve_device
from ..masks import MaskSet
from ..models import create_model
from ..training import TensorData, TrainConfig, train_classifier
from .moves import attack_start, bn_move
from .recipe import AttackRecipe


@dataclass
class StackRun:
    """One fine-tuning run: its start (already head-reset), subset, recipe, and mask (None: weights regrow)."""

    model: nn.Module
    data: TensorData
    cfg: TrainConfig
    mask: MaskSet | None = None
    head_only: bool = False

    def batch_sizes(self) -> list[int]:
        n, b = len(self.data), self.cfg.batch_size
        per_epoch = [b] * (n // b) + ([n % b] if n % b else [])
        return per_epoch * self.cfg.epochs


def train_run(run: StackRun, desc: str = "attack", *,
              batches: Callable[[int, torch.Generator], Iterator[TensorData]] | None = None,
              steps_per_epoch: int | None = None, observe: Callable[[int], None] | None = None) -> nn.Module:
    """Train one run on its own (the sequential path; the stacked engine trains many at once). `batches`
    replaces the recipe's shuffled epochs and `observe(t)` sees the weights between steps (`run_loop`)."""
    m = run.model
    if run.head_only:
        for p in m.encoder.parameters():
            p.requires_grad_(False)
        params, modules = list(m.head.parameters()), {"head": m.head}
    else:
        params, modules = list(m.parameters()), None
    torch.manual_seed(run.cfg.seed)
    train_classifier(m, run.data, run.cfg, params=params, mask=run.mask, train_modules=modules, desc=desc,
                     batches=batches, steps_per_epoch=steps_per_epoch, observe=observe)
    return m


def fine_tune(model: nn.Module, mask: MaskSet | None, train: TensorData, recipe: AttackRecipe,
              seed: int, device: str = "auto", cpu_bf16: bool = False) -> nn.Module:
    """Fine-tune a copy of `model` on `train` by `recipe`; returns the copy (the input is never modified)."""
    dev = resolve_device(device)
    m, use_mask = attack_start(model, mask, recipe, seed, dev)
    bn_move(m, recipe, train)
    return train_run(StackRun(m, train, recipe.train_config(seed, str(dev), cpu_bf16), use_mask,
                              head_only=recipe.train == "head"), f"attack {recipe.name}")


def scratch_model(arch: str, num_classes: int, seed: int, arch_args: dict | None = None) -> nn.Module:
    """The baseline's starting point: the same architecture from random init, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(arch, num_classes, **(arch_args or {}))
