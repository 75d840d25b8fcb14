"""Wall time of a full attack grid (protected + scratch, 1 seed), run one after another and with worker processes.

Each variant gets its own empty scratch cache and report folder, so nothing is reused between them.
    python benchmarks/bench_eval_grid.py runs/mnist_small.safetensors --target usps --workers 1 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _record import record

from edgeguard.evaluation.attack import AttackRecipe
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import DEFAULT_GRID


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--target", default="usps")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()
    rows = ["| model | target | grid | workers | device | wall s | speed-up | SLC-AUC |", "|---|---|---|---|---|---|---|---|"]
    base = None
    for w in a.workers:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["EDGEGUARD_CACHE"] = str(Path(tmp) / "cache")
            cfg = EvalConfig(target=a.target, attacks=[AttackRecipe(epochs=a.epochs)], grid=DEFAULT_GRID,
                             device=a.device, workers=w)
            t = time.perf_counter()
            res = evaluate_model(a.model, cfg, Path(tmp) / "rep")
            wall = time.perf_counter() - t
        base = base or wall
        rows.append(f"| {Path(a.model).name} | {a.target} | 10 ratios, protected + scratch, 1 seed, {a.epochs} ep | "
                    f"{w} | {res['device']} | {wall:.1f} | {base / wall:.2f}× | {res['attacks'][0]['slc_auc'][0]:+.3f} |")
        print(rows[-1], flush=True)
    record("Attack grid wall time, sequential vs worker processes", rows)


if __name__ == "__main__":
    main()
