"""`edgeguard evaluate`: plan the attack grid for a model file, execute it with resume and a scratch-curve
cache, grade it and write the report.

Every finished fine-tuning run is appended to DIR/runs.jsonl at once, so a killed evaluation resumes from
the runs already done. Scratch runs (random init, same subsets and recipe) are cached per point under
$EDGEGUARD_CACHE/scratch keyed by (architecture, domain, recipe, ratio, seed, data cap): trained once, reused.
Planning: plan.py; execution (local, processes, Ray): execute.py; grading: summary.py; the result: result.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact import Artifact
from ..devices import resolve_device
from ..errors import EdgeguardError
from ..paths import report_folder
from ..progress import progress
from .config import EvalConfig
from .execute import TaskSpec, _Context, default_max_stack, load_context, resolve_executor, run_stacks
from .plan import GridKey, RunJob, grid_jobs, plan_stacks, run_steps, search_finals, search_jobs
from .result import EvalResult
from .runs import RunLog, cache_scratch, cached_scratch
from .summary import search_curves, summarise

logger = logging.getLogger(__name__)


def evaluate_model(model_path: str | os.PathLike, cfg: EvalConfig, report_dir: str | os.PathLike,
                   unprotected: str | os.PathLike | None = None) -> EvalResult:
    """Run the grid for every attack (protected, scratch, and the unprotected model if given); write reports.
    A run that fails removes the report folder it created, unless finished runs in it can be resumed."""
    cfg.validate()
    cfg, chosen = resolve_executor(cfg, cfg.device)
    logger.info(chosen)
    with report_folder(report_dir) as folder:
        return _evaluate_into(model_path, cfg, folder, unprotected, chosen)


@dataclass
class _Grid:
    """One evaluation's loaded inputs and where its finished runs go."""

    art: Artifact
    ref: Artifact | None
    ctx: _Context
    spec: TaskSpec
    key: GridKey
    log: RunLog
    max_stack: int
    stats: dict


def _load(model_path, cfg: EvalConfig, report_dir: Path, unprotected) -> _Grid:
    spec = TaskSpec(str(model_path), str(unprotected) if unprotected else None, cfg)
    ctx = load_context(spec, str(resolve_device(cfg.device)))
    art, ref = ctx.art, ctx.ref
    if ref is not None and (ref.card.arch != art.card.arch):
        raise EdgeguardError("--unprotected must be the same architecture as the protected model")
    if ref is not None and ref.card.classes != art.card.classes:
        raise EdgeguardError(f"--unprotected {unprotected} has the classes {', '.join(ref.card.classes[:8])}…, the "
                             f"protected model {', '.join(art.card.classes[:8])}…; give the source model it was made from")
    key = GridKey(cfg.target, cfg.max_train, cfg.max_test, cfg.class_map,
                  hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
                  hashlib.sha256(Path(unprotected).read_bytes()).hexdigest() if unprotected else None,
                  art.card.arch, art.card.arch_args)
    return _Grid(art, ref, ctx, spec, key, RunLog(report_dir / "runs.jsonl"),
                 cfg.max_stack or default_max_stack(ctx.device), {"stacks": 0, "runs": 0})


def _execute(g: _Grid, batch: list[RunJob], desc: str) -> None:
    """Train the jobs of `batch` not yet in runs.jsonl (a cached scratch run is copied in instead)."""
    todo: list[RunJob] = []
    for job in {j.key: j for j in sorted(batch, key=lambda j: j.kind == "scratch")}.values():  # one run per key
        if job.key in g.log.done:
            continue
        row = cached_scratch(job.key) if job.kind == "scratch" else None
        if row is not None:
            g.log.add({**row, "cached": True})
        else:
            todo.append(job)

    def finished(row: dict) -> None:
        if row["kind"] == "scratch":
            cache_scratch(row)
        g.log.add(row)

    labels = g.ctx.train.y.cpu().numpy()
    steps = {j.key: run_steps(j, labels, g.ctx.num_classes) for j in batch}
    stacks = plan_stacks(todo, steps, g.max_stack)
    g.stats["stacks"] += len(stacks)
    g.stats["runs"] += len(todo)
    bar = progress(None, desc=desc, total=sum(steps.values()))
    bar.update(sum(steps.values()) - sum(steps[j.key] for j in todo))
    try:
        run_stacks(g.spec, g.ctx, stacks, finished, bar, steps)
    finally:
        bar.close()


def _evaluate_into(model_path: str | os.PathLike, cfg: EvalConfig, report_dir: Path,
                   unprotected: str | os.PathLike | None, chosen: str = "") -> EvalResult:
    from .report import write_report

    g = _load(model_path, cfg, report_dir, unprotected)
    jobs = grid_jobs(cfg.attacks, cfg.seeds, cfg.grid, g.key)
    trials = search_jobs(cfg.search_trials, cfg.search_seed, cfg.seeds, cfg.grid, g.key)
    t0 = time.perf_counter()
    _execute(g, jobs + trials, f"evaluate → {cfg.target}")
    finals = search_finals(trials, g.log.accuracy(), g.key)
    if finals:
        _execute(g, finals, f"search finals → {cfg.target}")
    wall = time.perf_counter() - t0
    search = search_curves(finals, g.log.done, cfg, g.ref is not None) if finals else None
    result = summarise(g.art, g.ref, cfg, jobs, g.log.done, g.ctx.test, search)
    result.wall_seconds = round(wall, 2)
    result.device = g.ctx.device
    result.engine = {"executor": cfg.executor, "chosen": chosen, **g.stats, "max_stack": g.max_stack,
                     "cpu_bf16": g.ctx.cpu_bf16}
    write_report(result, report_dir)
    return result
