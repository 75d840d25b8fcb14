"""Planning the attack grid: every fine-tuning run an evaluation needs (`RunJob`), the key that names it in
runs.jsonl and the scratch cache, the attacker's subset of each run, and how runs are packed into stacks."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeguardError
from ..finetune import AttackRecipe, scratch_recipe
from .suites import search_recipes


@dataclass(frozen=True)
class RunJob:
    """One fine-tuning run of a grid: which model (protected, unprotected, scratch), recipe, seed, ratio; `key`
    names its line in runs.jsonl and its scratch-cache file."""

    kind: str
    recipe: AttackRecipe
    seed: int
    ratio: float
    key: str
    split: str = "full"  # full: train on the ratio's subset, score on the test set; trial: a search trial

    @property
    def trains(self) -> str:
        """What the run trains (`all`, `head` or `input`): runs of one stack train the same."""
        return "all" if self.kind == "scratch" or self.recipe.reinit >= 1 else self.recipe.train


@dataclass(frozen=True)
class GridKey:
    """What every key of one evaluation shares: the data, the model files' hashes, the architecture."""

    target: str
    max_train: int | None
    max_test: int | None
    class_map: str | None
    model_sha: str
    ref_sha: str | None
    arch: str
    arch_args: dict


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def recipe_for_scratch(r: AttackRecipe) -> dict:
    d = scratch_recipe(r).key()
    for k in ("train", "head", "pruned"):  # scratch always trains everything from random init
        d.pop(k)
    return d


def job_key(kind: str, recipe: AttackRecipe, seed: int, ratio: float, g: GridKey, split: str = "full") -> str:
    """The run's name. A full re-initialisation starts from the scratch model whatever the file, so its run is
    the scratch run of the same recipe (one key, trained once): an attacker can always start over. Starting over
    on the source sample first does not read the file either: one key for every model of the architecture."""
    if recipe.restarts:
        kind = "scratch"
    data_key = {"domain": g.target, "max_train": g.max_train, "max_test": g.max_test}
    if g.class_map:  # other labels, other runs
        data_key["class_map"] = g.class_map
    extra = {"split": split} if split != "full" else {}
    if kind == "scratch":
        return _key({"arch": g.arch, "arch_args": g.arch_args, "r": recipe_for_scratch(recipe), "s": seed,
                     "ratio": ratio, **data_key, **extra})
    if recipe.reinit >= 1:
        return _key({"arch": g.arch, "arch_args": g.arch_args, "r": recipe.key(), "s": seed, "ratio": ratio,
                     **data_key, **extra})
    return _key({"m": g.model_sha if kind == "protected" else g.ref_sha, "r": recipe.key(), "s": seed,
                 "ratio": ratio, **data_key, **extra})


def grid_jobs(attacks: list[AttackRecipe], seeds: int, grid, g: GridKey) -> list[RunJob]:
    """Every run of the grid: protected (and unprotected) per recipe, scratch per distinct scratch recipe."""
    jobs: list[RunJob] = []
    kinds = ["protected"] + (["unprotected"] if g.ref_sha is not None else [])
    for recipe in attacks:
        for seed in range(seeds):
            for ratio in grid:
                jobs += [RunJob(kind, recipe, seed, ratio, job_key(kind, recipe, seed, ratio, g)) for kind in kinds]
    for recipe in {json.dumps(recipe_for_scratch(r), sort_keys=True): r for r in attacks}.values():
        for seed in range(seeds):
            for ratio in grid:
                jobs.append(RunJob("scratch", recipe, seed, ratio, job_key("scratch", recipe, seed, ratio, g)))
    return jobs


def search_jobs(trials: int, search_seed: int, seeds: int, grid, g: GridKey) -> list[RunJob]:
    """The random search's trials: every candidate recipe at every (model, seed, ratio), trained on 80 % of the
    attacker's subset and scored on the other 20 % (never on the test set)."""
    if trials <= 0:
        return []
    kinds = ["protected", "scratch"] + (["unprotected"] if g.ref_sha is not None else [])
    out, seen = [], set()
    for recipe in search_recipes(trials, search_seed):
        for kind in kinds:
            r = scratch_recipe(recipe) if kind == "scratch" else recipe
            for seed in range(seeds):
                for ratio in grid:
                    key = job_key(kind, r, seed, ratio, g, "trial")
                    if key not in seen:
                        seen.add(key)
                        out.append(RunJob(kind, r, seed, ratio, key, "trial"))
    return out


def best_trials(trials: list[RunJob], accuracy: dict[str, float]) -> dict[tuple, RunJob]:
    """(kind, seed, ratio) → the trial with the best validation accuracy (the first of equals)."""
    best: dict[tuple, tuple[float, RunJob]] = {}
    for j in trials:
        acc = accuracy[j.key]
        k = (j.kind, j.seed, j.ratio)
        if k not in best or acc > best[k][0]:
            best[k] = (acc, j)
    return {k: v[1] for k, v in best.items()}


def search_finals(trials: list[RunJob], accuracy: dict[str, float], g: GridKey) -> list[RunJob]:
    """The search's chosen recipe at each (model, seed, ratio), retrained on the whole subset and tested."""
    return [RunJob(kind, j.recipe, seed, ratio, job_key(kind, j.recipe, seed, ratio, g))
            for (kind, seed, ratio), j in best_trials(trials, accuracy).items()]


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


def split_indices(labels, job: RunJob, num_classes: int):
    """The run's training indices and, for a search trial, its validation indices (20 % of the subset, at
    least one; a one-sample subset validates on itself)."""
    idx = stratified_subset(labels, job.ratio, job.seed, num_classes)
    if job.split == "full":
        return idx, None
    perm = np.random.default_rng([job.seed, 4242, int(round(job.ratio * 1e6))]).permutation(idx)
    n_val = max(1, int(round(0.2 * len(perm)))) if len(perm) > 1 else 0
    return (np.sort(perm[n_val:]), np.sort(perm[:n_val])) if n_val else (idx, idx)


def run_steps(job: RunJob, labels, num_classes: int) -> int:
    n = len(split_indices(labels, job, num_classes)[0])
    return job.recipe.epochs * math.ceil(n / job.recipe.batch_size)


def plan_stacks(todo: list[RunJob], steps: dict[str, int], max_stack: int) -> list[list[RunJob]]:
    """Pack runs into stacks of at most `max_stack`: runs that can share one (one optimizer family, the same
    part trained) grouped, longest first, so runs of equal step count end up side by side."""
    groups: dict[tuple, list[RunJob]] = {}
    for j in sorted(todo, key=lambda j: (-steps[j.key], j.kind, j.seed)):
        groups.setdefault((j.recipe.optimizer, j.trains), []).append(j)
    stacks = [g[i : i + max_stack] for g in groups.values() for i in range(0, len(g), max_stack)]
    return sorted(stacks, key=lambda s: -max(steps[j.key] for j in s))
