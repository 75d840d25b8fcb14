"""One fine-tuning run: its start, subset, recipe and mask (`StackRun`), trained on its own through the one
training loop (`train_run`). The stacked engine trains many such runs at once on the same trajectories; the
hardening runs its simulated attacks through `train_run` too, observing the weights between steps."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import EdgeguardError
from ..masks import MaskSet
from ..models import create_model
from ..training import TensorData, TrainConfig, train_classifier
from . import phases
from .adapter import Adapted, adapt
from .moves import attack_start, bn_move, fresh_copy
from .phase_store import PhaseStore
from .recipe import AttackRecipe

PRE_SEED_OFFSET = 49979687  # the seed of a pre phase's fresh student or adapter is the run's seed + this


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
    if isinstance(m, Adapted):  # an input attack: only the adapter trains, the model stays as shipped
        params, modules = list(m.adapter.parameters()), {"adapter": m.adapter}
    elif run.head_only:
        for p in m.encoder.parameters():
            p.requires_grad_(False)
        params, modules = list(m.head.parameters()), {"head": m.head}
    else:
        params, modules = list(m.parameters()), None
    torch.manual_seed(run.cfg.seed)
    train_classifier(m, run.data, run.cfg, params=params, mask=run.mask, train_modules=modules, desc=desc,
                     batches=batches, steps_per_epoch=steps_per_epoch, observe=observe)
    return m


def _pre_phase(model: nn.Module, mask: MaskSet | None, recipe: AttackRecipe, seed: int, dev: torch.device,
               unlabelled: TensorData | None, store: PhaseStore, source: TensorData | None = None
               ) -> tuple[nn.Module, MaskSet | None]:
    """The recipe's phase before its moves, on a copy: `distil` and `shot` on unlabelled target images,
    `distil-source` on the source sample's images (its labels are never read: frames of the authorised scene)."""
    if recipe.pre not in ("distil", "distil-source", "shot"):
        return model, mask
    if recipe.pre == "distil-source":
        if source is None or len(source) == 0:
            raise EdgeguardError(f"attack {recipe.name}: distil-source needs the source sample (source_fraction > 0)")
        unlabelled = TensorData(source.x, torch.zeros_like(source.y))
    if unlabelled is None or len(unlabelled) == 0:
        raise EdgeguardError(f"attack {recipe.name}: the {recipe.pre} phase needs the target's unlabelled images")
    m = copy.deepcopy(model).to(dev)  # the student's or SHOT's copy; a store hit only loads its weights
    for p in m.parameters():
        p.requires_grad_(True)
    if recipe.pre in ("distil", "distil-source"):
        def distil() -> dict:  # the teacher and the fresh student are made only when the phase runs
            return phases.distil(copy.deepcopy(model).to(dev), fresh_copy(m, seed + PRE_SEED_OFFSET), unlabelled.to(dev),
                                 seed).state_dict()

        m.load_state_dict(store.get(("distil", phases.TEMPERATURE, *_settings(dev), model, seed, unlabelled), distil))
        return m, None
    held = mask if recipe.pruned == "masked" else None  # keyed by the caller's mask: its digest is remembered
    m.load_state_dict(store.get(("shot", *_settings(dev), model, held, seed, unlabelled),
                                lambda: phases.shot(m, unlabelled.to(dev), seed, held.to(dev) if held is not None else None)
                                .state_dict()))
    return m, mask


def _settings(dev: torch.device) -> tuple:
    """What every phase's result also depends on: the phase loop's constants and the device type."""
    return phases.PASSES, phases.MAX_STEPS, phases.BATCH, dev.type


def attack_run(model: nn.Module, mask: MaskSet | None, recipe: AttackRecipe, seed: int, data: TensorData,
               device: str | torch.device = "auto", *, unlabelled: TensorData | None = None,
               source: TensorData | None = None, cpu_bf16: bool = False, phase_store: PhaseStore | None = None
               ) -> StackRun:
    """Everything a recipe does before its fine-tuning, as a run ready to train: the pre phase on the target's
    `unlabelled` images, the moves on the start, the input adapter (restyled on the `source` sample), the source
    phase and the BatchNorm move. Pre phases and restyling do not depend on the ratio: `phase_store` keeps them
    (an evaluation's store is shared by its workers and kept on disk). `model` is never modified."""
    dev = resolve_device(device)
    store = phase_store if phase_store is not None else PhaseStore()
    start, start_mask = _pre_phase(model, mask, recipe, seed, dev, unlabelled, store, source)
    m, use_mask = attack_start(start, start_mask, recipe, seed, dev)
    cfg = recipe.train_config(seed, str(dev), cpu_bf16)
    if recipe.train == "input":
        m = adapt(m, seed + PRE_SEED_OFFSET)
        if recipe.pre == "restyle":
            if unlabelled is None or source is None:
                raise EdgeguardError(f"attack {recipe.name}: restyling needs unlabelled target and a source sample")
            adapted = m
            m.adapter.load_state_dict(store.get(
                ("restyle", *_settings(dev), model, seed, unlabelled, source),
                lambda: phases.restyle(adapted, unlabelled.to(dev), source.to(dev), seed).adapter.state_dict()))
        return StackRun(m, data, cfg, None)
    head_only = recipe.train == "head"
    if recipe.source_fraction > 0 and recipe.pre != "distil-source":  # distil-source read only the images
        if source is None:
            raise EdgeguardError(f"attack {recipe.name}: the source phase needs the source sample")
        m = train_run(StackRun(m, source, cfg, use_mask, head_only), "attack source phase")
    bn_move(m, recipe, data)
    return StackRun(m, data, cfg, use_mask, head_only=head_only)


def fine_tune(model: nn.Module, mask: MaskSet | None, train: TensorData, recipe: AttackRecipe,
              seed: int, device: str = "auto", cpu_bf16: bool = False, *, unlabelled: TensorData | None = None,
              source: TensorData | None = None) -> nn.Module:
    """Fine-tune a copy of `model` on `train` by `recipe`; returns the copy (the input is never modified).
    `unlabelled` target images feed a pre phase; `source` is the sample a source-aided or restyling recipe uses."""
    run = attack_run(model, mask, recipe, seed, train, device, unlabelled=unlabelled, source=source,
                     cpu_bf16=cpu_bf16)
    return train_run(run, f"attack {recipe.name}")


def scratch_model(arch: str, num_classes: int, seed: int, arch_args: dict | None = None) -> nn.Module:
    """The baseline's starting point: the same architecture from random init, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(arch, num_classes, **(arch_args or {}))
