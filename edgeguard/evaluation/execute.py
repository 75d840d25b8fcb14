"""Executing a planned grid: each stack of runs is prepared (the attacker's start, subset and moves) and
trained by the stacked engine, in this process (`local`), in spawned worker processes (`processes`, worker i
on cuda:i mod n) or as Ray tasks (`ray`); each finished run's row goes back to the caller at once."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifact import Artifact, load_artifact
from ..cache import cache_dir
from ..devices import cpu_bf16, resolve_device
from ..domains import get_domain
from ..errors import EdgeguardError
from ..finetune import StackRun, attack_run, scratch_model, scratch_recipe, train_run
from ..finetune.adapter import unwrap
from ..finetune.phase_store import PhaseStore
from ..finetune.stacked import train_stack
from ..masks import MaskSet
from ..training import TensorData, evaluate
from .config import EvalConfig
from .plan import RunJob, split_indices, stratified_subset


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
    phases: PhaseStore = field(default_factory=lambda: PhaseStore(cache_dir("phases")))  # shared by the workers

    def source(self) -> TensorData:
        if self.source_train is None:
            name = self.art.card.source_domain
            try:
                dom = get_domain(name, self.data_root, classes=self.art.card.classes, role="source",
                                 input=self.art.card.input)
            except EdgeguardError as e:
                raise EdgeguardError(f"a source-aided attack needs the model's source domain {name!r}: {e}") from None
            self.source_train = TensorData.from_numpy(dom.train_x, dom.train_y, self.device)
        return self.source_train


def _prepare(ctx: _Context, job: RunJob) -> StackRun:
    """The job's start model, subset, recipe and mask, exactly as a run on its own would use them. Pre phases
    (on the target's training images, never its test set), the source phase and the BN move happen here. A
    full re-initialisation is the scratch start itself: the same run, by construction (plan.py shares its key);
    with a source sample, that scratch start trains on the sample first."""
    import torch

    idx, _ = split_indices(ctx.train.y.cpu().numpy(), job, ctx.num_classes)
    data = ctx.train.take(idx)
    recipe = job.recipe
    if job.kind == "scratch" or recipe.reinit >= 1:
        card = ctx.art.card
        model = scratch_model(card.arch, card.num_classes, job.seed, card.arch_args).to(torch.device(ctx.device))
        if job.kind == "scratch" or recipe.restarts:
            return StackRun(model, data, scratch_recipe(recipe).train_config(job.seed, ctx.device, ctx.cpu_bf16))
        start, mask, recipe = model, None, replace(recipe, reinit=0.0)  # starting over on the source sample first
    else:
        src = ctx.art if job.kind == "protected" else ctx.ref
        start, mask = src.model, src.mask
    source = None
    if recipe.source_fraction > 0:
        src_data = ctx.source()
        source = src_data.take(stratified_subset(src_data.y.cpu().numpy(), recipe.source_fraction, job.seed,
                                                 ctx.num_classes))
    unlabelled = TensorData(ctx.train.x, torch.zeros_like(ctx.train.y))  # the labels are not the attacker's
    return attack_run(start, mask, recipe, job.seed, data, ctx.device, unlabelled=unlabelled,
                      source=source, cpu_bf16=ctx.cpu_bf16, phase_store=ctx.phases)


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
    if src is not None and src.mask is not None and job.recipe.reinit < 1:  # a fresh start holds no mask
        bad = MaskSet(src.mask.masks).violations(dict(unwrap(tuned).named_parameters()))
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


def load_context(spec: TaskSpec, device: str) -> _Context:
    """The models and the target data an evaluation's runs share, on `device`."""
    cfg = spec.cfg
    dev = resolve_device(device)
    art = load_artifact(spec.model_path, dev)
    dom = get_domain(cfg.target, cfg.data_root, classes=art.card.classes,
                     class_map=cfg.class_map, input=art.card.input).subset(cfg.max_train, cfg.max_test)
    return _Context(art, load_artifact(spec.unprotected, dev) if spec.unprotected else None,
                    TensorData.from_numpy(dom.train_x, dom.train_y, dev),
                    TensorData.from_numpy(dom.test_x, dom.test_y, dev), dom.num_classes, str(dev),
                    cpu_bf16(cfg.precision, dev), data_root=cfg.data_root)


def _context(spec: TaskSpec, device: str) -> _Context:
    """The worker's context, loaded once per (model, target, device) and reused by its later stacks."""
    cfg = spec.cfg
    key = (spec.model_path, spec.unprotected, cfg.target, cfg.max_train, cfg.max_test, cfg.data_root, device,
           cfg.precision)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = load_context(spec, device)
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


def run_stacks(spec: TaskSpec, ctx: _Context, stacks: list[list[RunJob]], finished: Callable[[dict], None], bar,
               steps: dict[str, int]) -> None:
    """Train `stacks` with the config's executor; `finished(row)` as each run ends, `bar` counts run-steps."""
    if spec.cfg.executor == "local":
        for stack in stacks:
            run_stack(ctx, stack, finished, bar.update)
    elif stacks and spec.cfg.executor == "processes":
        _run_processes(spec, stacks, finished, bar, steps)
    elif stacks:
        _run_ray(spec, stacks, finished, bar, steps)
