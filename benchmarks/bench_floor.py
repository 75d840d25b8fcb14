"""The floor of the adaptive suite over several evaluation seeds: what an attacker with source images reaches
whatever the protection, as a robust SLC-AUC against the scratch envelope of every adaptive recipe.

Two floors: `restart-source` (start over on 1 % of the labelled source set: reads nothing of the file) and
`distil-source` (a fresh student distilled from MODEL on 10 % of the source images, labels never read, then
fine-tuned: it depends on the file only through its source function). The suite run here is those two
recipes plus every adaptive recipe's scratch run as a restart (so the scratch envelope is the adaptive one).
A report folder that holds earlier runs (scratch and restart keys do not depend on the model) is resumed.
    python benchmarks/bench_floor.py runs/cnn32_mnist.safetensors --target usps \
        --grid 0.001,0.005,0.01,0.05,0.2 --seeds 3 --executor processes --workers 2 --reports runs/floor
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from _record import record

from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid, slc_auc
from edgeguard.evaluation.suites import get_suite
from edgeguard.finetune.recipe import scratch_recipe

FLOORS = ("restart-source", "distil-source")


def floor_recipes() -> list:
    """The two floors and a restart for each distinct scratch recipe of the adaptive suite."""
    out, seen = [], set()
    for r in get_suite("adaptive").recipes:
        if r.label in FLOORS:
            out.append(r)
            continue
        s = replace(scratch_recipe(r), reinit=1.0, pruned="free", label=f"restart ({r.label})")
        key = json.dumps(s.key(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--target", default="usps")
    ap.add_argument("--grid", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reports", default="runs/floor")
    a = ap.parse_args()
    grid = parse_grid(a.grid)
    cfg = EvalConfig(target=a.target, attacks=floor_recipes(), grid=grid, seeds=a.seeds, device=a.device,
                     executor=a.executor, workers=a.workers, suite="floor")
    res = evaluate_model(a.model, cfg, Path(a.reports)).to_dict()
    scratch = res["suite"]["scratch_envelope"]
    rows = ["| floor | SLC-AUC per evaluation seed | mean ± std | accuracy % by n (seed 0) |", "|---|---|---|---|"]
    for name in FLOORS:
        curves = next(e for e in res["attacks"] if e["attack"] == name)["protected"]
        vals = [slc_auc(grid, c, s)["slc_auc"] for c, s in zip(curves, scratch)]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(f"| {name} | {' / '.join(f'{v:+.3f}' for v in vals)} | {statistics.mean(vals):+.2f} ± {std:.2f} | "
                    f"{' / '.join(f'{x * 100:.1f}' for x in curves[0])} |")
    rows.append(f"| scratch envelope (seed 0) | | | {' / '.join(f'{x * 100:.1f}' for x in scratch[0])} |")
    record(f"Adaptive-suite floor, {Path(a.model).name} → {a.target}, {a.seeds} evaluation seed(s)", rows)


if __name__ == "__main__":
    main()
