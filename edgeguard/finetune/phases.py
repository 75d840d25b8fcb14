"""Phases an attacker runs on the target's unlabelled images before fine-tuning (a camera buyer has plenty of
unlabelled frames; labels are what is scarce): `distil` trains a fresh student of the same architecture to
match the model's outputs (it keeps what the model knows and drops its mask and any trap in its weights),
`shot` adapts the encoder by information maximisation with the head frozen (SHOT, source-free adaptation),
`restyle` trains an input adapter so that target images produce the feature statistics of a few source images
(JailNTL's disguise, without labels). Each makes PASSES passes over the unlabelled images (at most MAX_STEPS
steps), seeded."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import MaskSet
from ..models.registry import input_of
from ..training import TensorData, TrainConfig, normalize, run_loop
from .adapter import Adapted

PASSES = 10  # passes over the unlabelled images of every phase
MAX_STEPS = 500
BATCH = 128
TEMPERATURE = 4.0  # distillation's softening


def _loop(modules: dict[str, nn.Module], params, images: TensorData, seed: int, lr: float, optimizer: str,
          loss: Callable[[torch.Tensor], torch.Tensor], mask: MaskSet | None = None, model: nn.Module | None = None
          ) -> None:
    """PASSES passes (at most MAX_STEPS steps) of `loss(normalised batch)` on batches drawn from `images` with
    replacement, seeded."""
    dev = images.x.device
    spec = input_of(next(iter(modules.values())) if model is None else model)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=lr, weight_decay=0.0, optimizer=optimizer, scheduler="none",
                      seed=seed, device=str(dev), augment_shift=0)

    def batches(epoch: int, gen: torch.Generator):
        for _ in range(min(MAX_STEPS, math.ceil(PASSES * len(images) / BATCH))):
            idx = torch.randint(len(images), (min(BATCH, len(images)),), generator=gen, device=gen.device)
            yield normalize(images.x[idx.to(dev)], spec)

    def step(x: torch.Tensor):
        value = loss(x)
        return value, {"loss": float(value.detach())}

    run_loop(modules, params, cfg, batches, step, desc="",
             before_step=(lambda: mask.mask_grads_(model)) if mask is not None else None,
             after_step=(lambda: mask.zero_masked_(model)) if mask is not None else None)


def _information_max(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's objective: confident predictions (low mean entropy) that use every class (high marginal entropy)."""
    p = logits.float().softmax(1)
    mean_entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
    marginal = p.mean(0)
    return mean_entropy + (marginal * marginal.clamp_min(1e-8).log()).sum()


def distil(teacher: nn.Module, student: nn.Module, images: TensorData, seed: int) -> nn.Module:
    """`student` (a fresh init) trained to match `teacher`'s softened outputs on unlabelled `images`."""
    teacher.eval()

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = (teacher(x).float() / TEMPERATURE).softmax(1)
        s = (student(x).float() / TEMPERATURE).log_softmax(1)
        return F.kl_div(s, t, reduction="batchmean") * TEMPERATURE ** 2

    _loop({"student": student}, student.parameters(), images, seed, 1e-3, "adam", loss)
    return student


def shot(model: nn.Module, images: TensorData, seed: int, mask: MaskSet | None = None) -> nn.Module:
    """The encoder adapted to unlabelled `images` by information maximisation, the head frozen (SHOT's SGD)."""
    head = [p for p in model.head.parameters()]
    for p in head:
        p.requires_grad_(False)
    _loop({"model": model}, model.encoder.parameters(), images, seed, 1e-2, "sgd",
          lambda x: _information_max(model(x)), mask=mask, model=model)
    for p in head:
        p.requires_grad_(True)
    return model


def _feature_stats(model: nn.Module, x: torch.Tensor
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-channel mean and standard deviation of every convolution's output on `x` (the model's "style"), and
    the model's logits."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m, _i, out):
        o = out.float()
        stats.append((o.mean((0, 2, 3)), o.std((0, 2, 3))))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return stats, logits


def restyle(adapted: Adapted, images: TensorData, source: TensorData, seed: int) -> Adapted:
    """The adapter trained so that adapted target images give the frozen model the feature statistics of the
    `source` sample, with information maximisation on its predictions; no target label is read."""
    spec = input_of(adapted.model)
    with torch.no_grad():
        want, _ = _feature_stats(adapted.model, normalize(source.x.to(images.x.device), spec))

    def loss(x: torch.Tensor) -> torch.Tensor:
        got, logits = _feature_stats(adapted.model, adapted.adapter(x))
        style = sum(F.mse_loss(m, wm) + F.mse_loss(s, ws) for (m, s), (wm, ws) in zip(got, want)) / len(want)
        return style + _information_max(logits)

    _loop({"adapter": adapted.adapter}, adapted.adapter.parameters(), images, seed, 1e-2, "adam", loss,
          model=adapted)
    return adapted
