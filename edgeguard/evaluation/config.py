"""An evaluation's settings (`EvalConfig`): the target, the recipes, the grid and how the runs execute."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EdgeguardError
from ..finetune import AttackRecipe
from .slc_auc import DEFAULT_GRID

EXECUTORS = ("auto", "local", "processes", "ray")
PRECISIONS = ("auto", "fp32", "bf16")


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
