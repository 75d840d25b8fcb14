"""`edgeguard evaluate`: run the attack grid for a model file, with resume and a scratch-curve cache.

Every finished fine-tuning run is appended to DIR/runs.jsonl at once, so a killed evaluation resumes from
the runs already done. Scratch runs (random init, same subsets and recipe) are cached per point under
$EDGEGUARD_CACHE/scratch keyed by (architecture, domain, recipe, ratio, seed, data cap): trained once, reused.
Runs are packed into stacks (`stacked.py`) and the stacks handed to an executor: `local` (this process),
`processes` (`--workers` spawned processes, worker i on cuda:i mod n) or `ray` (one Ray task per stack).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from runtime.fileio import atomic_write_text

from .. import cache
from ..artifact import Artifact, load_artifact
from ..devices import cpu_bf16, resolve_device
from ..domains import get_domain
from ..errors import EdgeguardError
from ..masks import MaskSet
from ..paths import report_folder
from ..progress import progress
from ..training import TensorData, evaluate, reestimate_bn
from .attack import AttackRecipe, attack_start, scratch_model, stratified_subset, train_run
from .metrics import direct_metrics, mean_std
from .slc_auc import DEFAULT_GRID, slc_auc
from .stacked import StackRun, train_stack

logger = logging.getLogger(__name__)
EXECUTORS = ("auto", "local", "processes", "ray")
PRECISIONS = ("auto", "fp32", "bf16")


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
    def trains_head_only(self) -> bool:
        return self.kind != "scratch" and self.recipe.train == "head"


@dataclass
class EvalConfig:
    target: str
    attacks: list[AttackRecipe] = field(default_factory=lambda: [AttackRecipe()])
    grid: tuple[float, ...] = DEFAULT_GRID
    seeds: int = 1
    max_train: int | None = None  # cap on the target training pool (tests, quick looks)
    max_test: int | None = None
    device: str = "auto"
    data_root: str | None = None
    workers: int = 1  # processes for --executor processes (worker i on cuda:i mod n)
    executor: str = "local"  # auto | local | processes | ray (auto: `resolve_executor`)
    max_stack: int | None = None  # runs per stack (None: the device's default, see default_max_stack)
    precision: str = "auto"  # auto: bf16 autocast where the CPU has native bf16, and on CUDA; fp32
    ray_address: str | None = None  # None: start a local Ray; auto or HOST:PORT: join a cluster
    cpus_per_task: int = 1  # Ray: CPUs reserved per stack on a CPU cluster
    suite: str | None = None  # the suite's name, for the report (its recipes are in `attacks`)
    search_trials: int = 0  # > 0: also a random search of this many trials per (model, seed, ratio)
    search_seed: int = 0
    class_map: str | None = None  # --class-map: how the target's classes pair with the model's (default: by name)

    def validate(self) -> None:
        if self.seeds < 1:
            raise EdgeguardError("--seeds must be at least 1")
        if self.executor not in EXECUTORS:
            raise EdgeguardError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.precision not in PRECISIONS:
            raise EdgeguardError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_stack is not None and self.max_stack < 1:
            raise EdgeguardError("--max-stack must be at least 1")
        if self.workers < 1 or self.cpus_per_task < 1:
            raise EdgeguardError("--workers and --cpus-per-task must be at least 1")
        if self.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise EdgeguardError("--executor ray needs Ray: pip install -e '.[ray]'") from None


def free_cores() -> int:
    """Cores this process may use that the 1-minute load average does not already keep busy."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, cores - int(round(busy)))


def resolve_executor(cfg: EvalConfig, device) -> tuple[EvalConfig, str]:
    """`auto`: worker processes, one per free core, when a CPU has more than one core free (1.92x against
    1.55x for the local stack on a 2-core CPU, RESULTS "Attack grid wall time"); the local stack on a GPU or a
    single free core. Returns the config to run and the line that says what was chosen."""
    if cfg.executor != "auto":
        return cfg, f"executor {cfg.executor}"
    if resolve_device(device).type == "cuda":
        return replace(cfg, executor="local"), "executor auto → local (one GPU: the runs share it as stacks)"
    free = free_cores()
    if free > 1:
        return (replace(cfg, executor="processes", workers=free),
                f"executor auto → processes ×{free} ({free} CPU cores free)")
    return replace(cfg, executor="local"), "executor auto → local (one CPU core free)"


def default_max_stack(device) -> int:
    """Runs per stack: on a CPU a stack larger than 2 spills the caches and each run gets slower (RESULTS);
    a GPU is far from full with one small run."""
    return 32 if resolve_device(device).type == "cuda" else 2


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def _scratch_cache() -> Path:
    return cache.cache_dir("scratch")


def _recipe_for_scratch(r: AttackRecipe) -> dict:
    d = scratch_recipe(r).key()
    for k in ("train", "head", "pruned"):  # scratch always trains everything from random init
        d.pop(k)
    return d


class RunLog:
    """Append-only JSONL of finished runs; a line is written only after its run completed."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.done[row["key"]] = row
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a crash is simply redone

    def add(self, row: dict) -> None:
        self.done[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def grid_jobs(art: Artifact, ref: Artifact | None, cfg: EvalConfig, model_sha: str, ref_sha: str | None
              ) -> list[RunJob]:
    """Every run of the grid: protected (and unprotected) per recipe, scratch per distinct scratch recipe."""
    jobs: list[RunJob] = []
    kinds = ["protected"] + (["unprotected"] if ref is not None else [])
    for recipe in cfg.attacks:
        for seed in range(cfg.seeds):
            for ratio in cfg.grid:
                for kind in kinds:
                    jobs.append(RunJob(kind, recipe, seed, ratio,
                                       _job_key(kind, recipe, seed, ratio, cfg, model_sha, ref_sha, art)))
    for recipe in {json.dumps(_recipe_for_scratch(r), sort_keys=True): r for r in cfg.attacks}.values():
        for seed in range(cfg.seeds):
            for ratio in cfg.grid:
                jobs.append(RunJob("scratch", recipe, seed, ratio,
                                   _job_key("scratch", recipe, seed, ratio, cfg, model_sha, ref_sha, art)))
    return jobs


def evaluate_model(model_path: str | os.PathLike, cfg: EvalConfig, report_dir: str | os.PathLike,
                   unprotected: str | os.PathLike | None = None) -> dict:
    """Run the grid for every attack (protected, scratch, and the unprotected model if given); write reports.
    A run that fails removes the report folder it created, unless finished runs in it can be resumed."""
    cfg.validate()
    cfg, chosen = resolve_executor(cfg, cfg.device)
    logger.info(chosen)
    with report_folder(report_dir) as folder:
        return _evaluate_into(model_path, cfg, folder, unprotected, chosen)


def _evaluate_into(model_path: str | os.PathLike, cfg: EvalConfig, report_dir: Path,
                   unprotected: str | os.PathLike | None, chosen: str = "") -> dict:
    from .report import write_report

    dev = resolve_device(cfg.device)
    art = load_artifact(model_path, dev)
    ref = load_artifact(unprotected, dev) if unprotected else None
    dom = get_domain(cfg.target, cfg.data_root, classes=art.card.classes, class_map=cfg.class_map)
    if ref is not None and (ref.card.arch != art.card.arch):
        raise EdgeguardError("--unprotected must be the same architecture as the protected model")
    if ref is not None and ref.card.classes != art.card.classes:
        raise EdgeguardError(f"--unprotected {unprotected} has the classes {', '.join(ref.card.classes[:8])}…, the "
                             f"protected model {', '.join(art.card.classes[:8])}…; give the source model it was made from")
    dom = dom.subset(cfg.max_train, cfg.max_test)
    train = TensorData.from_numpy(dom.train_x, dom.train_y, dev)
    test = TensorData.from_numpy(dom.test_x, dom.test_y, dev)
    model_sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    ref_sha = hashlib.sha256(Path(unprotected).read_bytes()).hexdigest() if unprotected else None
    jobs = grid_jobs(art, ref, cfg, model_sha, ref_sha)
    trials = search_jobs(art, ref, cfg, model_sha, ref_sha)

    log = RunLog(report_dir / "runs.jsonl")
    cache_dir = _scratch_cache()
    max_stack = cfg.max_stack or default_max_stack(dev)
    ctx = _Context(art, ref, train, test, dom.num_classes, str(dev), cpu_bf16(cfg.precision, dev),
                   data_root=cfg.data_root)
    task = TaskSpec(str(model_path), str(unprotected) if unprotected else None, cfg)
    t0 = time.perf_counter()
    stats = {"stacks": 0, "runs": 0}

    def execute(batch: list[RunJob], desc: str) -> None:
        todo = []
        for job in batch:
            if job.key in log.done:
                continue
            cache_file = cache_dir / f"{job.key}.json"
            if job.kind == "scratch" and cache_file.exists():
                try:
                    log.add({**json.loads(cache_file.read_text()), "cached": True})
                    continue
                except json.JSONDecodeError:
                    cache_file.unlink(missing_ok=True)
            todo.append(job)

        def finished(row: dict) -> None:
            if row["kind"] == "scratch":
                cache_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache_dir / f"{row['key']}.json", json.dumps(row))
            log.add(row)

        steps = {j.key: _steps(j, dom.train_y, dom.num_classes) for j in batch}
        stacks = plan_stacks(todo, steps, max_stack)
        stats["stacks"] += len(stacks)
        stats["runs"] += len(todo)
        bar = progress(None, desc=desc, total=sum(steps.values()))
        bar.update(sum(steps.values()) - sum(steps[j.key] for j in todo))
        try:
            if cfg.executor == "local":
                for stack in stacks:
                    run_stack(ctx, stack, finished, bar.update)
            elif stacks and cfg.executor == "processes":
                _run_processes(task, stacks, finished, bar, steps)
            elif stacks:
                _run_ray(task, stacks, finished, bar, steps)
        finally:
            bar.close()

    execute(jobs + trials, f"evaluate → {cfg.target}")
    finals = search_finals(trials, log, cfg, model_sha, ref_sha, art)
    if finals:
        execute(finals, f"search finals → {cfg.target}")
    wall = time.perf_counter() - t0

    results = summarise(art, ref, cfg, jobs, log, dom_name=cfg.target, test=test)
    if finals:
        results["attacks"].append(search_entry(trials, finals, log, cfg, ref is not None))
    results["suite"] = suite_summary(results["attacks"], cfg)
    results["wall_seconds"] = round(wall, 2)
    results["device"] = str(dev)
    results["engine"] = {"executor": cfg.executor, "chosen": chosen, **stats, "max_stack": max_stack,
                         "cpu_bf16": cpu_bf16(cfg.precision, dev)}
    write_report(results, report_dir)
    return results


def _job_key(kind: str, recipe: AttackRecipe, seed: int, ratio: float, cfg: EvalConfig, model_sha: str,
             ref_sha: str | None, art: Artifact, split: str = "full") -> str:
    data_key = {"domain": cfg.target, "max_train": cfg.max_train, "max_test": cfg.max_test}
    if cfg.class_map:  # other labels, other runs
        data_key["class_map"] = cfg.class_map
    extra = {"split": split} if split != "full" else {}
    if kind == "scratch":
        return _key({"arch": art.card.arch, "arch_args": art.card.arch_args, "r": _recipe_for_scratch(recipe),
                     "s": seed, "ratio": ratio, **data_key, **extra})
    return _key({"m": model_sha if kind == "protected" else ref_sha, "r": recipe.key(), "s": seed, "ratio": ratio,
                 **data_key, **extra})


def search_jobs(art: Artifact, ref: Artifact | None, cfg: EvalConfig, model_sha: str, ref_sha: str | None
                ) -> list[RunJob]:
    """The random search's trials: every candidate recipe at every (model, seed, ratio), trained on 80 % of the
    attacker's subset and scored on the other 20 % (never on the test set)."""
    from .suites import search_recipes

    if cfg.search_trials <= 0:
        return []
    kinds = ["protected", "scratch"] + (["unprotected"] if ref is not None else [])
    out, seen = [], set()
    for recipe in search_recipes(cfg.search_trials, cfg.search_seed):
        for kind in kinds:
            r = scratch_recipe(recipe) if kind == "scratch" else recipe
            for seed in range(cfg.seeds):
                for ratio in cfg.grid:
                    key = _job_key(kind, r, seed, ratio, cfg, model_sha, ref_sha, art, "trial")
                    if key not in seen:
                        seen.add(key)
                        out.append(RunJob(kind, r, seed, ratio, key, "trial"))
    return out


def _best_trials(trials: list[RunJob], log: RunLog) -> dict[tuple, RunJob]:
    """(kind, seed, ratio) → the trial with the best validation accuracy (the first of equals)."""
    best: dict[tuple, tuple[float, RunJob]] = {}
    for j in trials:
        acc = log.done[j.key]["accuracy"]
        k = (j.kind, j.seed, j.ratio)
        if k not in best or acc > best[k][0]:
            best[k] = (acc, j)
    return {k: v[1] for k, v in best.items()}


def search_finals(trials: list[RunJob], log: RunLog, cfg: EvalConfig, model_sha: str, ref_sha: str | None,
                  art: Artifact) -> list[RunJob]:
    """The search's chosen recipe at each (model, seed, ratio), retrained on the whole subset and tested."""
    return [RunJob(kind, j.recipe, seed, ratio, _job_key(kind, j.recipe, seed, ratio, cfg, model_sha, ref_sha, art))
            for (kind, seed, ratio), j in _best_trials(trials, log).items()]


def search_entry(trials: list[RunJob], finals: list[RunJob], log: RunLog, cfg: EvalConfig, has_ref: bool) -> dict:
    """The search as one more curve per model: at each ratio, the test accuracy of the recipe it chose."""
    by = {(j.kind, j.seed, j.ratio): j for j in finals}

    def curve(kind: str) -> list[list[float]]:
        return [[log.done[by[(kind, s, r)].key]["accuracy"] for r in cfg.grid] for s in range(cfg.seeds)]

    def chosen(kind: str) -> list[list[str]]:
        return [[by[(kind, s, r)].recipe.name for r in cfg.grid] for s in range(cfg.seeds)]

    prot, scr = curve("protected"), curve("scratch")
    per_seed = [slc_auc(cfg.grid, p, q) for p, q in zip(prot, scr)]
    entry = {"attack": "search", "recipe": {"trials": cfg.search_trials, "seed": cfg.search_seed},
             "ratios": list(cfg.grid), "n": [log.done[by[("protected", 0, r)].key]["n"] for r in cfg.grid],
             "protected": prot, "scratch": scr,
             "slc_auc": mean_std(d["slc_auc"] for d in per_seed),
             "slc_auc_normalised": mean_std(d["slc_auc_normalised"] for d in per_seed),
             "chosen": {"protected": chosen("protected"), "scratch": chosen("scratch")},
             "regrown_weights": [log.done[by[("protected", s, r)].key].get("regrown_weights", 0)
                                 for s in range(cfg.seeds) for r in cfg.grid]}
    if has_ref:
        entry["unprotected"] = curve("unprotected")
        entry["chosen"]["unprotected"] = chosen("unprotected")
        entry["unprotected_slc_auc"] = mean_std(slc_auc(cfg.grid, u, q)["slc_auc"]
                                                for u, q in zip(entry["unprotected"], scr))
    return entry


def suite_summary(entries: list[dict], cfg: EvalConfig) -> dict | None:
    """The attacker's best recipe: at each ratio the best accuracy any recipe reached, for the protected model
    and for scratch training alike; robust SLC-AUC = AUC(protected envelope) − AUC(scratch envelope). Both
    envelopes pick on the test set, which favours the attacker and the scratch baseline alike."""
    if len(entries) < 2:
        return None
    grid = list(cfg.grid)
    out: dict = {"name": cfg.suite or "custom", "recipes": [e["attack"] for e in entries],
                 "selection": "per ratio on the test set, for the protected and the scratch curves alike"}
    for kind in ("protected", "scratch", "unprotected"):
        if all(kind in e for e in entries):
            arr = np.asarray([e[kind] for e in entries], dtype=float)  # recipe × seed × ratio
            out[f"{kind}_envelope"] = arr.max(0).tolist()
            out[f"{kind}_winner"] = [entries[i]["attack"] for i in arr.mean(1).argmax(0)]
    per_seed = [slc_auc(grid, p, q) for p, q in zip(out["protected_envelope"], out["scratch_envelope"])]
    out["robust_slc_auc"] = mean_std(d["slc_auc"] for d in per_seed)
    out["robust_slc_auc_normalised"] = mean_std(d["slc_auc_normalised"] for d in per_seed)
    if "unprotected_envelope" in out:
        out["unprotected_robust_slc_auc"] = mean_std(
            slc_auc(grid, u, q)["slc_auc"] for u, q in zip(out["unprotected_envelope"], out["scratch_envelope"]))
    out["per_recipe_slc_auc"] = {e["attack"]: e["slc_auc"] for e in entries}
    return out


def split_indices(labels, job: RunJob, num_classes: int):
    """The run's training indices and, for a search trial, its validation indices (20 % of the subset, at
    least one; a one-sample subset validates on itself)."""
    idx = stratified_subset(labels, job.ratio, job.seed, num_classes)
    if job.split == "full":
        return idx, None
    perm = np.random.default_rng([job.seed, 4242, int(round(job.ratio * 1e6))]).permutation(idx)
    n_val = max(1, int(round(0.2 * len(perm)))) if len(perm) > 1 else 0
    return (np.sort(perm[n_val:]), np.sort(perm[:n_val])) if n_val else (idx, idx)


def _steps(job: RunJob, labels, num_classes: int) -> int:
    n = len(split_indices(labels, job, num_classes)[0])
    return job.recipe.epochs * math.ceil(n / job.recipe.batch_size)


def plan_stacks(todo: list[RunJob], steps: dict[str, int], max_stack: int) -> list[list[RunJob]]:
    """Pack runs into stacks of at most `max_stack`: runs that can share one (one optimizer family, all or
    head-only training) grouped, longest first, so runs of equal step count end up side by side."""
    groups: dict[tuple, list[RunJob]] = {}
    for j in sorted(todo, key=lambda j: (-steps[j.key], j.kind, j.seed)):
        groups.setdefault((j.recipe.optimizer, j.trains_head_only), []).append(j)
    stacks = [g[i : i + max_stack] for g in groups.values() for i in range(0, len(g), max_stack)]
    return sorted(stacks, key=lambda s: -max(steps[j.key] for j in s))


@dataclass
class _Context:
    """What every run needs: the models, the target data, the device, the CPU precision."""

    art: Artifact
    ref: Artifact | None
    train: TensorData
    test: TensorData
    num_classes: int
    device: str
    cpu_bf16: bool = False
    source_train: TensorData | None = None  # loaded when a recipe is source-aided
    data_root: str | None = None

    def source(self) -> TensorData:
        if self.source_train is None:
            name = self.art.card.source_domain
            try:
                dom = get_domain(name, self.data_root, classes=self.art.card.classes, role="source")
            except EdgeguardError as e:
                raise EdgeguardError(f"a source-aided attack needs the model's source domain {name!r}: {e}") from None
            self.source_train = TensorData.from_numpy(dom.train_x, dom.train_y, self.device)
        return self.source_train


def scratch_recipe(recipe: AttackRecipe) -> AttackRecipe:
    """What training from scratch uses of a recipe: the optimizer and its schedule, on everything."""
    return replace(recipe, train="all", head="kept", pruned="masked", bn="kept", source_fraction=0.0)


def _prepare(ctx: _Context, job: RunJob) -> StackRun:
    """The job's start model, subset, recipe and mask, exactly as a run on its own would use them. A
    source-aided recipe's source phase and the BN attacker's re-estimation happen here, before the stack."""
    import torch

    idx, _ = split_indices(ctx.train.y.cpu().numpy(), job, ctx.num_classes)
    data = ctx.train.take(idx)
    dev = torch.device(ctx.device)
    if job.kind == "scratch":
        card = ctx.art.card
        recipe = scratch_recipe(job.recipe)
        model = scratch_model(card.arch, card.num_classes, job.seed, card.arch_args).to(dev)
        mask = None
    else:
        src = ctx.art if job.kind == "protected" else ctx.ref
        recipe = job.recipe
        model, mask = attack_start(src.model, src.mask, recipe, job.seed, dev)
    cfg = recipe.train_config(job.seed, ctx.device, ctx.cpu_bf16)
    head_only = recipe.train == "head"
    if recipe.source_fraction > 0:
        src_data = ctx.source()
        sidx = stratified_subset(src_data.y.cpu().numpy(), recipe.source_fraction, job.seed, ctx.num_classes)
        model = train_run(StackRun(model, src_data.take(sidx), cfg, mask, head_only), "attack source phase")
    if recipe.bn == "reestimate":
        reestimate_bn(model, data, recipe.batch_size)
    return StackRun(model, data, cfg, mask, head_only=head_only)


def _row(ctx: _Context, job: RunJob, run: StackRun, tuned, seconds: float, stack: int) -> dict:
    """A finished run's line: test accuracy, or for a search trial the accuracy on its validation split."""
    if job.split == "trial":
        _, val = split_indices(ctx.train.y.cpu().numpy(), job, ctx.num_classes)
        scored_on = ctx.train.take(val)
    else:
        scored_on = ctx.test
    acc = evaluate(tuned, scored_on.to(next(tuned.parameters()).device))
    point = {"ratio": job.ratio, "n": len(run.data), "seed": job.seed, "accuracy": acc}
    if job.split == "trial":
        point["split"] = "trial"
    src = ctx.art if job.kind == "protected" else ctx.ref if job.kind == "unprotected" else None
    if src is not None and src.mask is not None:
        bad = MaskSet(src.mask.masks).violations(dict(tuned.named_parameters()))
        point["regrown_weights"] = int(sum(max(v, 0) for v in bad.values()))
    return {"key": job.key, "kind": job.kind, "attack": job.recipe.name if job.kind != "scratch" else "scratch",
            "recipe": job.recipe.key(), **point, "seconds": round(seconds, 3), "stack": stack}


def run_stack(ctx: _Context, jobs: list[RunJob], finished: Callable[[dict], None],
              on_steps: Callable[[int], None] | None = None) -> None:
    """Train one stack; each run's row goes to `finished` as soon as that run is done."""
    t = time.perf_counter()
    runs = [_prepare(ctx, j) for j in jobs]

    def done(i: int, model) -> None:
        finished(_row(ctx, jobs[i], runs[i], model, time.perf_counter() - t, len(jobs)))

    if len(runs) > 1 and train_stack(runs, ctx.device, on_done=done, progress=on_steps) is not None:
        return
    for job, run in zip(jobs, runs):  # one run, or an architecture the engine cannot stack
        t = time.perf_counter()
        tuned = train_run(run, f"attack {job.recipe.name if job.kind != 'scratch' else 'scratch'}")
        finished(_row(ctx, job, run, tuned, time.perf_counter() - t, 1))
        if on_steps:
            on_steps(len(run.batch_sizes()))


@dataclass(frozen=True)
class TaskSpec:
    """What a worker (process or Ray task) needs to rebuild the context: paths and the config."""

    model_path: str
    unprotected: str | None
    cfg: EvalConfig


_CONTEXTS: dict[tuple, _Context] = {}


def _context(spec: TaskSpec, device: str) -> _Context:
    """The worker's context, loaded once per (model, target, device) and reused by its later stacks."""
    cfg = spec.cfg
    key = (spec.model_path, spec.unprotected, cfg.target, cfg.max_train, cfg.max_test, cfg.data_root, device,
           cfg.precision)
    if key not in _CONTEXTS:
        dev = resolve_device(device)
        art = load_artifact(spec.model_path, dev)
        dom = get_domain(cfg.target, cfg.data_root, classes=art.card.classes,
                         class_map=cfg.class_map).subset(cfg.max_train, cfg.max_test)
        _CONTEXTS[key] = _Context(art, load_artifact(spec.unprotected, dev) if spec.unprotected else None,
                                  TensorData.from_numpy(dom.train_x, dom.train_y, dev),
                                  TensorData.from_numpy(dom.test_x, dom.test_y, dev), dom.num_classes, str(dev),
                                  cpu_bf16(cfg.precision, dev), data_root=cfg.data_root)
    return _CONTEXTS[key]


def stack_task(spec: TaskSpec, jobs: list[RunJob], device: str) -> list[dict]:
    """A stack trained in a worker; its rows come back together."""
    rows: list[dict] = []
    run_stack(_context(spec, device), jobs, rows.append)
    return rows


_WORKER_DEVICE: str | None = None


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the evaluation that started it (a killed `evaluate` leaves no orphans):
    the kernel's parent-death signal on Linux, and a watchdog thread everywhere."""
    import signal
    import threading

    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_device(device: str, index: int) -> str:
    """Worker i's device: cuda:(i mod n) when the evaluation runs on every GPU (`auto` or `cuda`), else as asked."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda" and device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return str(dev)


def _worker_init(spec: TaskSpec, threads: int, parent: int, counter) -> None:
    """Each worker process takes the next index (its GPU), then loads the models and data once."""
    global _WORKER_DEVICE
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(threads)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER_DEVICE = worker_device(spec.cfg.device, index)
    _context(spec, _WORKER_DEVICE)


def _worker_run(spec: TaskSpec, jobs: list[RunJob]) -> list[dict]:
    return stack_task(spec, jobs, _WORKER_DEVICE)


def _run_processes(spec: TaskSpec, stacks: list[list[RunJob]], finished, bar, steps: dict[str, int]) -> None:
    """Stacks in `workers` spawned processes; each stack's rows are logged as soon as it returns."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(spec.cfg.workers, len(stacks))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(spec, threads, os.getpid(), counter)) as pool:
        futures = {pool.submit(_worker_run, spec, s): s for s in stacks}  # longest stacks first
        try:
            for fut in as_completed(futures):
                for row in fut.result():
                    finished(row)
                bar.update(sum(steps[j.key] for j in futures[fut]))
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _run_ray(spec: TaskSpec, stacks: list[list[RunJob]], finished, bar, steps: dict[str, int]) -> None:
    """One Ray task per stack (one GPU each on a GPU cluster, else `cpus_per_task` CPUs); rows stream back into
    runs.jsonl as tasks end, so a killed driver resumes from the stacks already done."""
    import ray

    import edgeguard

    cfg = spec.cfg
    if not ray.is_initialized():
        src = str(Path(edgeguard.__file__).resolve().parent.parent)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}}
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=max(cfg.cpus_per_task, os.cpu_count() or 1), runtime_env=env,
                     include_dashboard=False, log_to_driver=False)
    gpus = 1 if resolve_device(cfg.device).type == "cuda" else 0
    remote = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=gpus)(_ray_stack)
    pending = {remote.remote(spec, s): s for s in stacks}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                for row in ray.get(ref):
                    finished(row)
                bar.update(sum(steps[j.key] for j in pending.pop(ref)))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _ray_stack(spec: TaskSpec, jobs: list[RunJob]) -> list[dict]:
    import torch

    torch.set_num_threads(max(1, spec.cfg.cpus_per_task))
    device = "cuda" if resolve_device(spec.cfg.device).type == "cuda" else "cpu"
    return stack_task(spec, jobs, device)


def summarise(art: Artifact, ref: Artifact | None, cfg: EvalConfig, jobs: list[RunJob], log: RunLog, dom_name: str,
              test: TensorData) -> dict:
    rows = {j.key: log.done[j.key] for j in jobs}

    def same_recipe(j: RunJob, recipe: AttackRecipe) -> bool:
        if j.kind == "scratch":
            return _recipe_for_scratch(j.recipe) == _recipe_for_scratch(recipe)
        return j.recipe == recipe

    def curves(kind: str, recipe: AttackRecipe) -> list[list[float]]:
        return [[rows[j.key]["accuracy"] for j in jobs if j.kind == kind and j.seed == seed and same_recipe(j, recipe)]
                for seed in range(cfg.seeds)]

    def protected_runs(recipe: AttackRecipe) -> list[RunJob]:
        return [j for j in jobs if j.kind == "protected" and j.recipe == recipe]

    attacks = []
    for recipe in cfg.attacks:
        prot, scr = curves("protected", recipe), curves("scratch", recipe)
        per_seed = [slc_auc(cfg.grid, p, s) for p, s in zip(prot, scr)]
        entry = {"attack": recipe.name, "recipe": recipe.key(), "ratios": list(cfg.grid),
                 "n": [rows[j.key]["n"] for j in protected_runs(recipe) if j.seed == 0],
                 "protected": prot, "scratch": scr,
                 "slc_auc": mean_std(d["slc_auc"] for d in per_seed),
                 "slc_auc_normalised": mean_std(d["slc_auc_normalised"] for d in per_seed),
                 "regrown_weights": [rows[j.key].get("regrown_weights", 0) for j in protected_runs(recipe)]}
        if ref is not None:
            unp = curves("unprotected", recipe)
            entry["unprotected"] = unp
            entry["unprotected_slc_auc"] = mean_std(slc_auc(cfg.grid, u, s)["slc_auc"] for u, s in zip(unp, scr))
        attacks.append(entry)

    direct = None
    target_after = evaluate(art.model, test)
    card = art.card
    src_name = card.source_domain
    source_after = source_before = target_before = None
    try:
        src_dom = get_domain(src_name, cfg.data_root, classes=card.classes, role="source")  # whole test set
        src_test = TensorData.from_numpy(src_dom.test_x, src_dom.test_y, test.x.device)
        source_after = evaluate(art.model, src_test)
        if ref is not None:
            source_before = evaluate(ref.model, src_test)
    except EdgeguardError:
        pass
    if ref is not None:
        target_before = evaluate(ref.model, test)
    if source_before is None and card.source_accuracy is not None:
        source_before = card.source_accuracy.before
    recorded = card.accuracy(dom_name, "target")
    if target_before is None and recorded is not None:
        target_before = recorded.before
    if None not in (source_before, source_after, target_before):
        direct = direct_metrics(source_before, source_after, target_before, target_after)
    return {"model": str(art.path), "arch": card.arch, "method": card.method,
            "source_domain": src_name, "target": dom_name, "seeds": cfg.seeds, "grid": list(cfg.grid),
            "sparsity": card.mask.sparsity if card.mask else 0.0, "target_accuracy_direct": target_after,
            "source_accuracy": source_after, "direct": direct, "attacks": attacks,
            "unprotected_model": str(ref.path) if ref is not None else None}
