"""Protect a source model with MAP or NTP, then run the fine-tuning-attack grid; one row per (method, seed).

    python benchmarks/bench_protect.py --method ntp --source runs/mnist_small.safetensors --target usps --seeds 1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _record import record

from edgeguard.evaluation.attack import parse_attack
from edgeguard.evaluation.metrics import direct_metrics, mean_std
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["map", "ntp"], required=True)
    ap.add_argument("--setting", default="source-available")
    ap.add_argument("--source", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--grid", default=None)
    ap.add_argument("--attacks", default="direct-all/masked,direct-all/free",
                    help="comma-separated attacks, or 'none' to measure only the direct (no fine-tuning) metrics")
    ap.add_argument("--config", default="{}", help="JSON overrides of the method's config")
    ap.add_argument("--out", default="runs/bench_protect")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1, help="attack runs trained at once (processes)")
    a = ap.parse_args()
    attacks = [] if a.attacks == "none" else a.attacks.split(",")
    rows = ["| method | setting | pair | seed | protect s | sparsity | source before→after | ΔS | target before→after "
            "| ST-D |" + "".join(f" SLC-AUC {x} |" for x in attacks),
            "|---" * (10 + len(attacks)) + "|"]
    drops, targets = [], []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        out = Path(a.out) / f"{a.method}_{a.setting}_{Path(a.source).stem}_{a.target}_s{seed}.safetensors"
        t = time.perf_counter()
        if a.method == "map":
            from edgeguard.methods.map import MapConfig, protect_map

            r = protect_map(a.source, a.target, out, MapConfig(setting=a.setting, seed=seed, device=a.device,
                                                               **json.loads(a.config)))
        else:
            from edgeguard.methods.ntp import NtpConfig, protect_ntp

            r = protect_ntp(a.source, a.target, out, NtpConfig(seed=seed, device=a.device, **json.loads(a.config)))
        secs = time.perf_counter() - t
        slc = ""
        if attacks:
            cfg = EvalConfig(target=a.target, attacks=[parse_attack(x) for x in attacks],
                             grid=parse_grid(a.grid), seeds=1, device=a.device, workers=a.workers)
            res = evaluate_model(out, cfg, out.with_suffix(".report"))
            slc = " | ".join(f"{e['slc_auc'][0]:+.2f}" for e in res["attacks"])
        tb, ta = r[f"target_before:{a.target}"], r[f"target_after:{a.target}"]
        d = direct_metrics(r["source_before"], r["source_after"], tb, ta)
        ds = d["delta_s"]
        drops.append(ds)
        targets.append(ta * 100)
        std = "–" if d["st_d"] is None else f"{d['st_d']:.3f}"
        rows.append(f"| {a.method} | {a.setting if a.method == 'map' else '-'} | {Path(a.source).stem}→{a.target} | "
                    f"{seed} | {secs:.0f} | {r['sparsity'] * 100:.1f}% | {r['source_before'] * 100:.2f}→"
                    f"{r['source_after'] * 100:.2f} | {ds:.2f} | {tb * 100:.1f}→{ta * 100:.1f} | {std} |"
                    + (f" {slc} |" if slc else ""))
    if a.seeds > 1:
        (dm, dsd), (tm, tsd) = mean_std(drops), mean_std(targets)
        rows.append(f"| mean ± sd | | | {a.seeds} seeds | | | | {dm:.2f} ± {dsd:.2f} | →{tm:.1f} ± {tsd:.1f} | |"
                    + " |" * len(attacks))
    record(f"{a.method.upper()} protection and attack grid", rows)


if __name__ == "__main__":
    main()
