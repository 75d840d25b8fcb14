"""Fine-tuning attacks: the buyer owns the weights and fine-tunes a copy on n labelled target samples.

Four usual target-fine-tuning attacks come from two switches: which weights train (`all` or `head`) and
whether the head is `kept` or `reinit` (direct-all, direct-head, initFC-all, initFC-head). A third switch
says what happens to pruned weights: `masked` (they stay 0, the papers' protocol), `free` (they may grow
back: the buyer owns the file) or `regrow` (they restart from small random values, so zeros behind a ReLU
cannot stay dead). Beyond the optimizer and its schedule, two attacker moves happen before fine-tuning:
`bn=reestimate` re-estimates BatchNorm statistics on the attacker's subset, and `source_fraction` first
fine-tunes on a small source sample (TAR's switch attacker, TransNTL's repair). Accuracy is read after the
last epoch, never the best one.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import EdgeguardError
from ..finetune.moves import regrow_, reinit_head  # noqa: F401  (re-exported: the attack's moves)
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


# Fields added after runs.jsonl keys existed: left out of a key at their default, so old keys still match.
_KEY_DEFAULTS = {"augment_shift": 0, "schedule": "none", "bn": "kept", "source_fraction": 0.0}


@dataclass(frozen=True)
class AttackRecipe:
    """What the attacker trains and how. Defaults: NTP's recipe (Adam 1e-4, wd 8e-4, 30 epochs, batch 128)."""

    train: str = "all"  # all | head
    head: str = "kept"  # kept | reinit
    pruned: str = "masked"  # masked | free | regrow
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    lr: float = 1e-4
    weight_decay: float = 8e-4
    epochs: int = 30
    batch_size: int = 128
    augment_shift: int = 0  # random translation (pixels) of the attacker's batches; NTP's recipe has none
    schedule: str = "none"  # none | cosine | warmup-cosine
    bn: str = "kept"  # kept | reestimate (BatchNorm statistics from the attacker's subset before fine-tuning)
    source_fraction: float = 0.0  # > 0: first fine-tune on this fraction of the source training set
    label: str = field(default="", compare=False)  # the name a suite gives it (not part of the key)

    def validate(self) -> None:
        for name, val, allowed in (("train", self.train, ("all", "head")), ("head", self.head, ("kept", "reinit")),
                                   ("pruned", self.pruned, ("masked", "free", "regrow")),
                                   ("bn", self.bn, ("kept", "reestimate"))):
            if val not in allowed:
                raise EdgeguardError(f"attack {name} must be one of {', '.join(allowed)}, got {val!r}")
        if not 0 <= self.source_fraction <= 1:
            raise EdgeguardError(f"attack source_fraction must be in [0, 1], got {self.source_fraction}")
        self.train_config(0, "cpu").validate()

    @property
    def base_name(self) -> str:
        base = {v: k for k, v in NAMED_ATTACKS.items()}[(self.train, self.head)]
        return f"{base}/{self.pruned}"

    @property
    def name(self) -> str:
        """`direct-all/masked` for NTP's recipe; other settings are appended (`sgd lr=0.01 warmup-cosine`)."""
        if self.label:
            return self.label
        parts = [self.base_name]
        if (self.optimizer, self.lr) != ("adam", 1e-4):
            parts.append(f"{self.optimizer} lr={self.lr:g}")
        if self.weight_decay != 8e-4:
            parts.append(f"wd={self.weight_decay:g}")
        if self.schedule != "none":
            parts.append(self.schedule)
        if self.epochs != 30:
            parts.append(f"{self.epochs}ep")
        if self.batch_size != 128:
            parts.append(f"bs={self.batch_size}")
        if self.augment_shift:
            parts.append(f"shift={self.augment_shift}")
        if self.bn != "kept":
            parts.append("bn-reestimate")
        if self.source_fraction:
            parts.append(f"source {self.source_fraction:g}")
        return " ".join(parts)

    def train_config(self, seed: int, device: str, cpu_bf16: bool = False) -> TrainConfig:
        """The recipe as a training config; the memory layout and CPU precision are the engine's, not the
        recipe's (they change speed, not what a run learns beyond float rounding)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, scheduler=self.schedule,
                           augment_shift=self.augment_shift, seed=seed, device=device, channels_last=True,
                           cpu_bf16=cpu_bf16)

    def key(self) -> dict:
        """The recipe as a dict: names runs in runs.jsonl and the scratch cache (a field at its original
        default is left out, so keys written before the field existed still match)."""
        d = asdict(self)
        del d["label"]
        for k, default in _KEY_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AttackRecipe:
        """A recipe from a suite file's entry; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known - {"attack", "name"})
        if extra:
            raise EdgeguardError(f"unknown attack setting {extra[0]!r}; known: {', '.join(sorted(known))}")
        d = dict(d)
        label = d.pop("name", d.pop("label", ""))
        if "attack" in d:
            train, head, pruned = _parse_name(d.pop("attack"))
            d = {"train": train, "head": head, "pruned": pruned, **d}
        try:
            r = cls(**d, label=label)
        except TypeError as e:
            raise EdgeguardError(f"bad attack recipe {d}: {e}") from None
        for f in fields(cls):
            want = type(f.default)
            v = getattr(r, f.name)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(r, f.name, float(v))
            elif not isinstance(getattr(r, f.name), want):
                raise EdgeguardError(f"attack setting {f.name} must be a {want.__name__}, got {v!r}")
        r.validate()
        return r


def _parse_name(spec: str) -> tuple[str, str, str]:
    name, _, pruned = str(spec).lower().partition("/")
    if name not in NAMED_ATTACKS:
        raise EdgeguardError(f"unknown attack {spec!r}; use one of {', '.join(NAMED_ATTACKS)} "
                             "optionally followed by /masked, /free or /regrow")
    return (*NAMED_ATTACKS[name], pruned or "masked")


def parse_attack(spec: str, **recipe) -> AttackRecipe:
    """`direct-all/masked`, `initfc-head/free`, … (the pruned-weight mode defaults to masked)."""
    train, head, pruned = _parse_name(spec)
    r = AttackRecipe(train=train, head=head, pruned=pruned, **recipe)
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


def attack_start(model: nn.Module, mask: MaskSet | None, recipe: AttackRecipe, seed: int,
                 device: torch.device) -> tuple[nn.Module, MaskSet | None]:
    """The attacker's starting copy (head re-initialised, pruned weights regrown if the recipe says so) and the
    mask it keeps (None: pruned weights train freely)."""
    m = copy.deepcopy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(True)
    if recipe.head == "reinit":
        reinit_head(m, seed + 7919)
    use_mask = None
    if mask is not None and recipe.pruned == "masked":
        keep = {k: v for k, v in mask.masks.items()
                if not (recipe.head == "reinit" and k.startswith("head."))}  # a new head is the attacker's own
        use_mask = MaskSet(keep).to(device)
    elif mask is not None and recipe.pruned == "regrow":
        regrow_(m, mask, seed)
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
