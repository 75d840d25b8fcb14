"""Wall time of a full attack grid (protected + scratch, 1 seed), side by side in one run: the sequential path
as it was before the stacked engine (run from a git worktree of `--baseline-ref`), worker processes, and the
stacked engine (fp32 and the default precision).

Each variant gets its own empty scratch cache and report folder, so nothing is reused between them.
    python benchmarks/bench_eval_grid.py runs/mnist_small.safetensors --target usps --baseline-ref 98cc942
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import record

from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid
from edgeguard.finetune import AttackRecipe

REPO = Path(__file__).resolve().parent.parent

_BASELINE = """
import json, sys, time
try:
    from edgeguard.finetune import AttackRecipe
except ImportError:  # a commit from before the finetune package
    from edgeguard.evaluation.attack import AttackRecipe
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import DEFAULT_GRID
cfg = EvalConfig(target=sys.argv[2], attacks=[AttackRecipe(epochs=int(sys.argv[3]))], grid=DEFAULT_GRID,
                 device=sys.argv[4])
t = time.perf_counter()
res = evaluate_model(sys.argv[1], cfg, sys.argv[5])
res = res if isinstance(res, dict) else res.to_dict()
print(json.dumps({"wall": time.perf_counter() - t, "slc": res["attacks"][0]["slc_auc"][0], "device": res["device"]}))
"""


def baseline(ref: str, model: str, target: str, epochs: int, device: str, tmp: Path) -> dict:
    """Today's sequential path: the evaluation code at `ref`, in its own worktree and process."""
    tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree), "EDGEGUARD_CACHE": str(tmp / "cache_base")}
        out = subprocess.run([sys.executable, "-c", _BASELINE, str(Path(model).resolve()), target, str(epochs),
                              device, str(tmp / "rep_base")], env=env, cwd=tree, check=True, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--target", default="usps")
    ap.add_argument("--baseline-ref", default=None, help="git commit of the sequential path to compare with")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--grid", default=None, help="ratios (default: the default grid)")
    ap.add_argument("--variants", nargs="+", default=["processes", "stacked-fp32", "stacked"])
    a = ap.parse_args()
    rows = ["| variant | model | target | grid | device | wall s | speed-up | SLC-AUC |", "|---|---|---|---|---|---|---|---|"]
    ratios = parse_grid(a.grid)
    grid = f"{len(ratios)} ratios, protected + scratch, 1 seed, {a.epochs} ep"
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.baseline_ref:
            b = baseline(a.baseline_ref, a.model, a.target, a.epochs, a.device, tmp)
            base = b["wall"]
            rows.append(f"| sequential ({a.baseline_ref}) | {Path(a.model).name} | {a.target} | {grid} | {b['device']} "
                        f"| {base:.1f} | 1.00× | {b['slc']:+.3f} |")
            print(rows[-1], flush=True)
        for v in a.variants:
            os.environ["EDGEGUARD_CACHE"] = str(tmp / f"cache_{v}")
            kw = {"processes": dict(executor="processes", workers=2, max_stack=1),
                  "stacked-fp32": dict(precision="fp32"), "stacked": {}}[v]
            cfg = EvalConfig(target=a.target, attacks=[AttackRecipe(epochs=a.epochs)], grid=ratios,
                             device=a.device, **kw)
            t = time.perf_counter()
            res = evaluate_model(a.model, cfg, tmp / f"rep_{v}").to_dict()
            wall = time.perf_counter() - t
            base = base or wall
            eng = res["engine"]
            label = f"{v} ({eng['executor']}, ≤{eng['max_stack']}/stack, {'bf16' if eng['cpu_bf16'] else 'fp32'})"
            rows.append(f"| {label} | {Path(a.model).name} | {a.target} | {grid} | {res['device']} | {wall:.1f} | "
                        f"{base / wall:.2f}× | {res['attacks'][0]['slc_auc'][0]:+.3f} |")
            print(rows[-1], flush=True)
    record("Attack grid wall time: sequential path vs worker processes vs the stacked engine", rows)


if __name__ == "__main__":
    main()
