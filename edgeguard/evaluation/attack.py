"""Fine-tuning attacks: the buyer owns the weights and fine-tunes a copy on n labelled target samples.

Four usual target-fine-tuning attacks come from two switches: which weights train (`all` or `head`) and
whether the head is `kept` or `reinit` (direct-all, direct-head, initFC-all, initFC-head). A third switch
says what happens to pruned weights: `masked` (they stay 0, the papers' protocol) or `free` (they may grow
back: the buyer owns the file). Accuracy is read after the last epoch, never the best one.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import EdgeguardError
from ..masks import MaskSet
from ..models import create_model
from ..training import TensorData, TrainConfig, train_classifier
from .stacked import StackRun

NAMED_ATTACKS = {
    "direct-all": ("all", "kept"),
    "direct-head": ("head", "kept"),
    "initfc-all": ("all", "reinit"),
    "initfc-head": ("head", "reinit"),
}


@dataclass(frozen=True)
class AttackRecipe:
    """What the attacker trains and how. Defaults: NTP's recipe (Adam 1e-4, wd 8e-4, 30 epochs, batch 128)."""

    train: str = "all"  # all | head
    head: str = "kept"  # kept | reinit
    pruned: str = "masked"  # masked | free
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 8e-4
    epochs: int = 30
    batch_size: int = 128
    augment_shift: int = 0  # random translation (pixels) of the attacker's batches; NTP's recipe has none

    def validate(self) -> None:
        for field, val, allowed in (("train", self.train, ("all", "head")), ("head", self.head, ("kept", "reinit")),
                                    ("pruned", self.pruned, ("masked", "free"))):
            if val not in allowed:
                raise EdgeguardError(f"attack {field} must be one of {', '.join(allowed)}, got {val!r}")
        self.train_config(0, "cpu").validate()

    @property
    def name(self) -> str:
        base = {v: k for k, v in NAMED_ATTACKS.items()}[(self.train, self.head)]
        return f"{base}/{self.pruned}"

    def train_config(self, seed: int, device: str, cpu_bf16: bool = False) -> TrainConfig:
        """The recipe as a training config; the memory layout and CPU precision are the engine's, not the
        recipe's (they change speed, not what a run learns beyond float rounding)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, scheduler="none",
                           augment_shift=self.augment_shift, seed=seed, device=device, channels_last=True,
                           cpu_bf16=cpu_bf16)

    def key(self) -> dict:
        """The recipe as a dict: names runs in runs.jsonl and the scratch cache (a field at its original
        default is left out, so keys written before the field existed still match)."""
        d = asdict(self)
        if d["augment_shift"] == 0:
            del d["augment_shift"]
        return d


def parse_attack(spec: str, **recipe) -> AttackRecipe:
    """`direct-all/masked`, `initfc-head/free`, … (the pruned-weight mode defaults to masked)."""
    name, _, pruned = spec.lower().partition("/")
    if name not in NAMED_ATTACKS:
        raise EdgeguardError(f"unknown attack {spec!r}; use one of {', '.join(NAMED_ATTACKS)} "
                             "optionally followed by /masked or /free")
    train, head = NAMED_ATTACKS[name]
    r = AttackRecipe(train=train, head=head, pruned=pruned or "masked", **recipe)
    r.validate()
    return r


def stratified_subset(y: np.ndarray, ratio: float, seed: int, num_classes: int) -> np.ndarray:
    """Indices of round(ratio·N) samples drawn by seed, stratified by class, at least one per class present."""
    if not 0 < ratio <= 1:
        raise EdgeguardError(f"sample ratios must be in (0, 1], got {ratio}")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, int(round(ratio * 1e6))])
    n_total = max(int(round(ratio * len(y))), 1)
    picked = []
    present = [c for c in range(num_classes) if np.any(y == c)]
    for c in present:
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(n_total * len(idx) / len(y))))
        picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    out = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return np.sort(out)


def _reinit_head(model: nn.Module, seed: int) -> None:
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed + 7919)
        for m in model.head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def attack_start(model: nn.Module, mask: MaskSet | None, recipe: AttackRecipe, seed: int,
                 device: torch.device) -> tuple[nn.Module, MaskSet | None]:
    """The attacker's starting copy (head re-initialised if the recipe says so) and the mask it keeps."""
    m = copy.deepcopy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(True)
    if recipe.head == "reinit":
        _reinit_head(m, seed)
    use_mask = None
    if mask is not None and recipe.pruned == "masked":
        keep = {k: v for k, v in mask.masks.items()
                if not (recipe.head == "reinit" and k.startswith("head."))}  # a new head is the attacker's own
        use_mask = MaskSet(keep).to(device)
    return m, use_mask


def fine_tune(model: nn.Module, mask: MaskSet | None, train: TensorData, recipe: AttackRecipe,
              seed: int, device: str = "auto", cpu_bf16: bool = False) -> nn.Module:
    """Fine-tune a copy of `model` on `train` by `recipe`; returns the copy (the input is never modified)."""
    dev = resolve_device(device)
    m, use_mask = attack_start(model, mask, recipe, seed, dev)
    return train_run(StackRun(m, train, recipe.train_config(seed, str(dev), cpu_bf16), use_mask,
                              head_only=recipe.train == "head"), f"attack {recipe.name}")


def train_run(run: StackRun, desc: str = "attack") -> nn.Module:
    """One run trained on its own (the sequential path; the stacked engine trains many at once)."""
    m = run.model
    if run.head_only:
        for p in m.encoder.parameters():
            p.requires_grad_(False)
        params, modules = list(m.head.parameters()), {"head": m.head}
    else:
        params, modules = list(m.parameters()), None
    torch.manual_seed(run.cfg.seed)
    train_classifier(m, run.data, run.cfg, params=params, mask=run.mask, train_modules=modules, desc=desc)
    return m


def scratch_model(arch: str, num_classes: int, seed: int, arch_args: dict | None = None) -> nn.Module:
    """The baseline's starting point: the same architecture from random init, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(arch, num_classes, **(arch_args or {}))
