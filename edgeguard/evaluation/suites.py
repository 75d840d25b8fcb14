"""Attack suites: the recipes a buyer would try, as data (`edgeguard attacks` lists them).

A suite is a list of `AttackRecipe`s, each one line in a suite file and one name in the report, plus an
optional random search (`trials`). `paper` keeps the papers' numbers comparable; `standard` adds the pruned-
weight and head variants; `robust` adds optimizers and schedules the protection never saw, the BN, regrowth
and source-aided attackers; `adaptive` adds re-initialisation (full and partial; starting over on the
source-aided attacker's sample, which reads nothing of the file), shrink-and-perturb,
distil-then-fine-tune (on unlabelled target images, or on 10 % of the source set's images without their
labels: frames of the authorised scene), SHOT adaptation and the input-space attacks (reprogramming, restyling); `search` is
a random search over the recipe space, each trial chosen on a validation split of the attacker's own subset. A user's suite is a TOML or JSON file:

    [[recipe]]                       # or {"recipes": [{...}, ...]} in JSON
    attack = "direct-all/free"       # direct-all | direct-head | initfc-all | initfc-head | reprogram,
                                     # then /masked|free|regrow
    optimizer = "sgd"                # any AttackRecipe field: lr, weight_decay, epochs, batch_size, schedule, bn,
                                     # reinit, shrink, perturb, pre, …
    lr = 0.01
    name = "sgd-0.01"                # optional: the name in the report
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import EdgeguardError
from ..finetune import ATTACK_SPACE, AttackRecipe


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    recipes: tuple[AttackRecipe, ...]
    trials: int = 0  # > 0: a random search of this many trials besides the recipes

    def with_trials(self, trials: int | None) -> Suite:
        if trials is None:
            return self
        if trials < 1:
            raise EdgeguardError("--trials must be at least 1")
        return replace(self, trials=trials)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "trials": self.trials,
                "recipes": [{"name": r.name, **r.key()} for r in self.recipes]}


def _r(spec: str, name: str = "", **kw) -> AttackRecipe:
    """A suite's recipe, from the attack space (its weight decay for the optimizer unless given)."""
    return replace(ATTACK_SPACE.recipe(spec, **kw), label=name)


_PAPER = (_r("direct-all/masked", "paper"),)
_STANDARD = (_r("direct-all/masked", "paper"), _r("direct-all/free", "free"), _r("initfc-all/free", "initfc-free"),
             _r("direct-head/masked", "head-only"))
_WC = dict(schedule="warmup-cosine")
_ROBUST = _STANDARD + (
    _r("direct-all/free", "sgd-1e-3", optimizer="sgd", lr=1e-3, **_WC),
    _r("direct-all/free", "sgd-1e-2", optimizer="sgd", lr=1e-2, **_WC),
    _r("direct-all/free", "sgd-1e-1", optimizer="sgd", lr=1e-1, **_WC),
    _r("direct-all/free", "adam-1e-4-wc", lr=1e-4, **_WC),
    _r("direct-all/free", "adam-1e-3-wc", lr=1e-3, **_WC),
    _r("direct-all/free", "adamw-1e-4-wc", optimizer="adamw", lr=1e-4, **_WC),
    _r("direct-all/free", "adamw-1e-3-wc", optimizer="adamw", lr=1e-3, **_WC),
    _r("direct-all/free", "sgd-1e-2-60ep", optimizer="sgd", lr=1e-2, epochs=60, **_WC),
    _r("direct-all/free", "adam-1e-3-60ep", lr=1e-3, epochs=60, **_WC),
    _r("direct-all/free", "bn-reestimate", lr=1e-3, bn="reestimate", **_WC),
    _r("direct-all/regrow", "regrow", lr=1e-3, **_WC),
    _r("direct-all/free", "source-aided", lr=1e-3, source_fraction=0.01, **_WC),
)
_ADAPTIVE = _ROBUST + (
    _r("direct-all/free", "reinit-full", lr=1e-3, reinit=1.0, **_WC),
    _r("direct-all/free", "restart-source", lr=1e-3, reinit=1.0, source_fraction=0.01, **_WC),
    _r("direct-all/free", "reinit-top-half", lr=1e-3, reinit=0.5, **_WC),
    _r("direct-all/free", "reinit-top-quarter", lr=1e-3, reinit=0.25, **_WC),
    _r("direct-all/free", "shrink-perturb", lr=1e-3, shrink=0.4, perturb=0.1, **_WC),
    _r("direct-all/free", "distil", lr=1e-3, pre="distil", **_WC),
    _r("direct-all/free", "distil-source", lr=1e-3, pre="distil-source", source_fraction=0.1, **_WC),
    _r("direct-all/free", "shot", lr=1e-3, pre="shot", **_WC),
    _r("reprogram", "reprogram", lr=5e-2),
    _r("reprogram", "restyle", lr=5e-2, pre="restyle", source_fraction=0.01),
)

SUITES = {s.name: s for s in (
    Suite("paper", "NTP's recipe (Adam 1e-4, 30 epochs, pruned weights held at 0): the papers' numbers", _PAPER),
    Suite("standard", "paper + pruned weights free, a re-initialised head, head-only fine-tuning", _STANDARD),
    Suite("robust", "standard + SGD/Adam/AdamW with warm-up + cosine at several lr, 60-epoch runs, and the BN, "
                    "regrowth and source-aided attackers", _ROBUST),
    Suite("adaptive", "robust + the adaptive attacker: full and partial re-initialisation, starting over on the "
                      "source sample, shrink-and-perturb, "
                      "distil-then-fine-tune (on target or source frames), SHOT adaptation, input reprogramming "
                      "and restyling", _ADAPTIVE),
    Suite("search", "random search over optimizer, lr, epochs, batch, schedule, head, BN reset, partial "
                    "re-initialisation, shrink-and-perturb and pre phases; each trial "
                    "chosen on a validation split of the attacker's subset", (), trials=20),
)}

def search_recipes(trials: int, seed: int = 0) -> list[AttackRecipe]:
    """The search's candidate recipes, drawn from the attack space by `seed` (the same at every ratio)."""
    rng = np.random.default_rng([seed, 7331])
    return [ATTACK_SPACE.search_draw(rng, label=f"search-{t}") for t in range(trials)]


def with_recipes(suite: Suite | None, extra: list[AttackRecipe]) -> list[AttackRecipe]:
    """The suite's recipes followed by `extra` ones it does not already hold (by key): `--suite` with `--attack`."""
    recipes = list(suite.recipes) if suite else []
    keys = [r.key() for r in recipes]
    for r in extra:
        if r.key() not in keys:
            recipes.append(r)
            keys.append(r.key())
    return recipes


def list_suites() -> list[Suite]:
    return list(SUITES.values())


def get_suite(spec: str) -> Suite:
    """A named suite, or a TOML/JSON suite file."""
    if spec in SUITES:
        return SUITES[spec]
    path = Path(spec)
    if not path.exists():
        raise EdgeguardError(f"unknown suite {spec!r}: use one of {', '.join(SUITES)} or a .toml/.json file")
    return load_suite_file(path)


def load_suite_file(path: Path) -> Suite:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeguardError(f"{path}: cannot read the suite file ({e})") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the tomli backport (a dependency there)
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise EdgeguardError(f"{path}: not a valid {path.suffix.lstrip('.') or 'JSON'} suite file ({e})") from None
    if isinstance(data, list):
        data = {"recipes": data}
    if not isinstance(data, dict):
        raise EdgeguardError(f"{path}: a suite file holds a list of recipes")
    entries = data.get("recipes", data.get("recipe", []))
    trials = data.get("trials", 0)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise EdgeguardError(f"{path}: `recipes` must be a list of tables, one per recipe")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 0:
        raise EdgeguardError(f"{path}: `trials` must be a whole number ≥ 0")
    recipes = []
    for i, e in enumerate(entries):
        try:
            recipes.append(AttackRecipe.from_dict(e))
        except EdgeguardError as err:
            raise EdgeguardError(f"{path}: recipe {i + 1}: {err}") from None
    if not recipes and not trials:
        raise EdgeguardError(f"{path}: the suite has no recipe and no search trials")
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EdgeguardError(f"{path}: two recipes are named {dup!r}; give each its own `name`")
    return Suite(str(data.get("name", path.stem)), str(data.get("description", f"from {path}")), tuple(recipes),
                 trials)
