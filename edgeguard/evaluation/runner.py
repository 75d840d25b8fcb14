"""`edgeguard evaluate`: run the attack grid for a model file, with resume and a scratch-curve cache.

Every finished fine-tuning run is appended to DIR/runs.jsonl at once, so a killed evaluation resumes from
the runs already done. Scratch runs (random init, same subsets and recipe) are cached per point under
$EDGEGUARD_CACHE/scratch keyed by (architecture, domain, recipe, ratio, seed, data cap): trained once, reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.fileio import atomic_write_text

from ..artifact import Artifact, load_artifact
from ..devices import resolve_device
from ..domains import get_domain
from ..errors import EdgeguardError
from ..progress import progress
from ..training import TensorData, evaluate
from .attack import AttackRecipe, run_point, scratch_model
from .metrics import direct_metrics, mean_std
from .slc_auc import DEFAULT_GRID, slc_auc


@dataclass(frozen=True)
class RunJob:
    """One fine-tuning run of a grid: which model (protected, unprotected, scratch), recipe, seed, ratio; `key`
    names its line in runs.jsonl and its scratch-cache file."""

    kind: str
    recipe: AttackRecipe
    seed: int
    ratio: float
    key: str


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
    workers: int = 1  # runs trained at once, each in its own process (CPU threads or one GPU shared)


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def _scratch_cache() -> Path:
    return Path(os.environ.get("EDGEGUARD_CACHE", Path.home() / ".cache" / "edgeguard")) / "scratch"


def _recipe_for_scratch(r: AttackRecipe) -> dict:
    d = r.key()
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


def evaluate_model(model_path: str | os.PathLike, cfg: EvalConfig, report_dir: str | os.PathLike,
                   unprotected: str | os.PathLike | None = None) -> dict:
    """Run the grid for every attack (protected, scratch, and the unprotected model if given); write reports."""
    from .report import write_report

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(cfg.device)
    art = load_artifact(model_path, dev)
    ref = load_artifact(unprotected, dev) if unprotected else None
    dom = get_domain(cfg.target, cfg.data_root)
    if dom.num_classes != art.card.num_classes:
        raise EdgeguardError(f"target {cfg.target} has {dom.num_classes} classes but the model "
                             f"{art.card.num_classes}; the attack needs the same label space")
    if ref is not None and (ref.card.arch != art.card.arch):
        raise EdgeguardError("--unprotected must be the same architecture as the protected model")
    if cfg.seeds < 1:
        raise EdgeguardError("--seeds must be at least 1")
    dom = dom.subset(cfg.max_train, cfg.max_test)
    train = TensorData.from_numpy(dom.train_x, dom.train_y, dev)
    test = TensorData.from_numpy(dom.test_x, dom.test_y, dev)
    model_sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    ref_sha = hashlib.sha256(Path(unprotected).read_bytes()).hexdigest() if unprotected else None
    data_key = {"domain": cfg.target, "max_train": cfg.max_train, "max_test": cfg.max_test}

    jobs: list[RunJob] = []
    for recipe in cfg.attacks:
        for seed in range(cfg.seeds):
            for ratio in cfg.grid:
                jobs.append(RunJob("protected", recipe, seed, ratio,
                                   _key({"m": model_sha, "r": recipe.key(), "s": seed, "ratio": ratio, **data_key})))
                if ref is not None:
                    jobs.append(RunJob("unprotected", recipe, seed, ratio,
                                       _key({"m": ref_sha, "r": recipe.key(), "s": seed, "ratio": ratio, **data_key})))
    for recipe in {json.dumps(_recipe_for_scratch(r), sort_keys=True): r for r in cfg.attacks}.values():
        for seed in range(cfg.seeds):
            for ratio in cfg.grid:
                jobs.append(RunJob("scratch", recipe, seed, ratio,
                                   _key({"arch": art.card.arch, "arch_args": art.card.arch_args,
                                         "r": _recipe_for_scratch(recipe), "s": seed, "ratio": ratio, **data_key})))

    log = RunLog(report_dir / "runs.jsonl")
    cache_dir = _scratch_cache()
    todo = []
    for job in jobs:
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

    t0 = time.perf_counter()
    bar = progress(None, desc=f"evaluate → {cfg.target}", total=len(jobs))
    bar.update(len(jobs) - len(todo))
    try:
        if cfg.workers <= 1 or len(todo) <= 1:
            ctx = _Context(art, ref, train, test, dom.num_classes, str(dev))
            for job in todo:
                finished(_run_job(ctx, job))
                bar.update(1)
        else:
            _run_parallel(model_path, unprotected, cfg, todo, finished, bar)
    finally:
        bar.close()
    wall = time.perf_counter() - t0

    results = summarise(art, ref, cfg, jobs, log, dom_name=cfg.target, test=test)
    results["wall_seconds"] = round(wall, 2)
    results["device"] = str(dev)
    write_report(results, report_dir)
    return results


@dataclass
class _Context:
    """What every run needs: the models, the target data, the device."""

    art: Artifact
    ref: Artifact | None
    train: TensorData
    test: TensorData
    num_classes: int
    device: str


def _run_job(ctx: _Context, job: RunJob) -> dict:
    t = time.perf_counter()
    if job.kind == "scratch":
        card = ctx.art.card
        start = scratch_model(card.arch, card.num_classes, job.seed, card.arch_args)
        point = run_point(start, None, ctx.train, ctx.test, job.ratio,
                          AttackRecipe(**{**job.recipe.key(), "train": "all", "head": "kept"}), job.seed,
                          ctx.num_classes, ctx.device)
    else:
        src = ctx.art if job.kind == "protected" else ctx.ref
        point = run_point(src.model, src.mask, ctx.train, ctx.test, job.ratio, job.recipe, job.seed, ctx.num_classes,
                          ctx.device)
    return {"key": job.key, "kind": job.kind, "attack": job.recipe.name if job.kind != "scratch" else "scratch",
            "recipe": job.recipe.key(), **point, "seconds": round(time.perf_counter() - t, 3)}


_WORKER: _Context | None = None


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


def _worker_init(model_path, unprotected, cfg: EvalConfig, threads: int, parent: int) -> None:
    """Each worker process loads the models and the target data once, then takes runs."""
    global _WORKER
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(threads)
    dev = resolve_device(cfg.device)
    dom = get_domain(cfg.target, cfg.data_root).subset(cfg.max_train, cfg.max_test)
    _WORKER = _Context(load_artifact(model_path, dev), load_artifact(unprotected, dev) if unprotected else None,
                       TensorData.from_numpy(dom.train_x, dom.train_y, dev),
                       TensorData.from_numpy(dom.test_x, dom.test_y, dev), dom.num_classes, str(dev))


def _worker_run(job: RunJob) -> dict:
    return _run_job(_WORKER, job)


def _run_parallel(model_path, unprotected, cfg: EvalConfig, todo: list, finished, bar) -> None:
    """Independent runs in `cfg.workers` spawned processes; each result is logged as soon as it arrives."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(cfg.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(str(model_path), str(unprotected) if unprotected else None, cfg, threads,
                                       os.getpid())) as pool:
        # longest runs (largest ratios) first, so no worker is left with a big one at the end
        futures = [pool.submit(_worker_run, job) for job in sorted(todo, key=lambda j: -j.ratio)]
        try:
            for fut in as_completed(futures):
                finished(fut.result())
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


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
        src_dom = get_domain(src_name, cfg.data_root)  # the whole source test set: --max-test caps the target
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
