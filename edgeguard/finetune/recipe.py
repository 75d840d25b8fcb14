"""The attacker's recipe: what a fine-tuning attack trains and how, parsed in one place.

Four usual target-fine-tuning attacks come from two switches: which weights train (`all` or `head`) and
whether the head is `kept` or `reinit` (direct-all, direct-head, initFC-all, initFC-head). A third switch
says what happens to pruned weights: `masked` (they stay 0, the papers' protocol), `free` (they may grow
back: the buyer owns the file) or `regrow` (they restart from small random values, so zeros behind a ReLU
cannot stay dead). Beyond the optimizer and its schedule, two attacker moves happen before fine-tuning:
`bn=reestimate` re-estimates BatchNorm statistics on the attacker's subset, and `source_fraction` first
fine-tunes on a small source sample (TAR's switch attacker, TransNTL's repair).

The adaptive attacker (issue 30) adds moves on the start: `reinit` re-initialises the top share of the
layers (1.0: everything, which is training from scratch; with `source_fraction` it is starting over on the
source sample first, the floor no protection can push a source-aided attacker under), `shrink`/`perturb` is shrink-and-perturb
(θ ← shrink·θ + perturb·θ_fresh), and `pre` runs a phase on the target's unlabelled images first (`distil`: a
fresh student distilled from the model; `shot`: SHOT's information maximisation) or, `distil-source`, distils
the student on the source sample's images without their labels (a camera buyer films the authorised scene:
the student copies the source function and drops every trap in the weights). `reprogram` leaves the
weights alone and trains an input adapter through the frozen model; with `pre="restyle"` the adapter first
learns, from a few source images (`source_fraction`) and unlabelled target images, to make target inputs look
authorised (JailNTL's disguise).
"""
from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import EdgeguardError
from ..optim_names import OPTIMIZERS, SCHEDULES
from ..training import TrainConfig

NAMED_ATTACKS = {
    "direct-all": ("all", "kept"),
    "direct-head": ("head", "kept"),
    "initfc-all": ("all", "reinit"),
    "initfc-head": ("head", "reinit"),
    "reprogram": ("input", "kept"),
}
CHOICES = {"train": ("all", "head", "input"), "head": ("kept", "reinit"), "pruned": ("masked", "free", "regrow"),
           "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "bn": ("kept", "reestimate"),
           "pre": ("none", "distil", "distil-source", "shot", "restyle")}

# Fields added after runs.jsonl keys existed: left out of a key at their default, so old keys still match.
_KEY_DEFAULTS = {"augment_shift": 0, "schedule": "none", "bn": "kept", "source_fraction": 0.0, "reinit": 0.0,
                 "shrink": 1.0, "perturb": 0.0, "pre": "none"}


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
    source_fraction: float = 0.0  # > 0: first fine-tune on this fraction of the source set (restyle, distil-source: its images only)
    reinit: float = 0.0  # share of the layers, from the top, re-initialised (1.0: the scratch start)
    shrink: float = 1.0  # shrink-and-perturb: θ ← shrink·θ + perturb·θ_fresh before fine-tuning
    perturb: float = 0.0
    pre: str = "none"  # none | distil | distil-source | shot | restyle: a phase before fine-tuning
    label: str = field(default="", compare=False)  # the name a suite gives it (not part of the key)

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise EdgeguardError(f"attack {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.source_fraction <= 1:
            raise EdgeguardError(f"attack source_fraction must be in [0, 1], got {self.source_fraction}")
        if self.augment_shift < 0:
            raise EdgeguardError(f"attack augment_shift must be ≥ 0, got {self.augment_shift}")
        if not 0 <= self.reinit <= 1:
            raise EdgeguardError(f"attack reinit must be in [0, 1] (the share of layers re-initialised), got {self.reinit}")
        if not 0 <= self.shrink <= 1 or self.perturb < 0:
            raise EdgeguardError(f"attack shrink must be in [0, 1] and perturb ≥ 0, got {self.shrink}, {self.perturb}")
        if self.train == "input" and (self.head != "kept" or self.pre not in ("none", "restyle")):
            raise EdgeguardError("a reprogramming attack keeps the head and takes no pre phase but restyle")
        if self.train == "input" and (self.reinit or self.shrink != 1 or self.perturb or self.bn != "kept"):
            raise EdgeguardError("a reprogramming attack leaves the weights alone: no reinit, shrink, perturb or bn")
        if self.pre == "restyle" and self.train != "input":
            raise EdgeguardError("pre = restyle trains an input adapter: use it with the reprogram attack")
        if self.pre in ("restyle", "distil-source") and not 0 < self.source_fraction <= 1:
            raise EdgeguardError(f"pre = {self.pre} learns from source images: give source_fraction > 0")
        self.train_config(0, "cpu").validate()

    @property
    def restarts(self) -> bool:
        """Training from scratch itself: everything re-initialised and nothing learnt before the target run."""
        return self.reinit >= 1 and not self.source_fraction

    @property
    def base_name(self) -> str:
        base = {v: k for k, v in NAMED_ATTACKS.items()}[(self.train, self.head)]
        return base if self.train == "input" else f"{base}/{self.pruned}"  # an input attack moves no weight

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
        if self.reinit:
            parts.append(f"reinit={self.reinit:g}")
        if self.shrink != 1 or self.perturb:
            parts.append(f"shrink={self.shrink:g} perturb={self.perturb:g}")
        if self.pre != "none":
            parts.append(self.pre)
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
        """A recipe from a suite file's entry: every value checked against the field's declared type (an int
        where a float is declared is widened; a bool is never a number); unknown keys name themselves."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known - {"attack", "name"})
        if extra:
            raise EdgeguardError(f"unknown attack setting {extra[0]!r}; known: {', '.join(sorted(known))}")
        d = dict(d)
        label = d.pop("name", d.pop("label", ""))
        if "attack" in d:
            train, head, pruned = parse_name(d.pop("attack"))
            d = {"train": train, "head": head, "pruned": pruned, **d}
        values = {k: _typed(k, v) for k, v in d.items()}
        r = cls(**values, label=str(label))
        r.validate()
        return r


_TYPES = typing.get_type_hints(AttackRecipe)


def _typed(name: str, v):
    """`v` as the declared type of field `name`, or a one-line error."""
    want = _TYPES[name]
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
        raise EdgeguardError(f"attack setting {name} must be a {want.__name__}, got {v!r}")
    if want is float and not math.isfinite(v):
        raise EdgeguardError(f"attack setting {name} must be a finite number, got {v!r}")
    return v


def parse_name(spec: str) -> tuple[str, str, str]:
    """`initfc-all/free` → (train, head, pruned); the pruned-weight mode defaults to masked."""
    name, _, pruned = str(spec).lower().partition("/")
    if name not in NAMED_ATTACKS:
        raise EdgeguardError(f"unknown attack {spec!r}; use one of {', '.join(NAMED_ATTACKS)} "
                             "optionally followed by /masked, /free or /regrow")
    return (*NAMED_ATTACKS[name], pruned or "masked")


def parse_attack(spec: str, **recipe) -> AttackRecipe:
    """`direct-all/masked`, `initfc-head/free`, … with any other field as a keyword."""
    train, head, pruned = parse_name(spec)
    r = AttackRecipe(train=train, head=head, pruned=pruned, **recipe)
    r.validate()
    return r


def scratch_recipe(recipe: AttackRecipe) -> AttackRecipe:
    """What training from scratch uses of a recipe: the optimizer and its schedule, on everything."""
    return replace(recipe, train="all", head="kept", pruned="masked", bn="kept", source_fraction=0.0, reinit=0.0,
                   shrink=1.0, perturb=0.0, pre="none")
