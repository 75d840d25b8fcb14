"""Protect a source model with a registered method, then run the fine-tuning-attack grid; one row per seed.

    python benchmarks/bench_protect.py --method ntp --source runs/mnist_small.safetensors --target usps --seeds 1
    python benchmarks/bench_protect.py --method ntp ... --config '{"experimental": {"sim_weight": 1}}'
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _record import record

from edgeguard.evaluation.metrics import direct_metrics, mean_std
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid
from edgeguard.evaluation.suites import get_suite, with_recipes
from edgeguard.finetune import parse_attack
from edgeguard.protect import protect


def flat_overrides(d: dict, prefix: str = "") -> list[str]:
    """{"synth": {"n": 512}, "epochs": 4} → ["synth.n=512", "epochs=4"] (JSON null → None)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flat_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={'None' if v is None else v}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, help="a registered method (`edgeguard methods`)")
    ap.add_argument("--setting", default="source-available")
    ap.add_argument("--source", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--grid", default=None)
    ap.add_argument("--attacks", default="direct-all/masked,direct-all/free",
                    help="comma-separated attacks, or 'none' to measure only the direct (no fine-tuning) metrics")
    ap.add_argument("--config", default="{}", help="JSON overrides of the method's config (nested objects for "
                    "nested settings)")
    ap.add_argument("--out", default="runs/bench_protect")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--executor", default="local", choices=["local", "processes", "ray"],
                    help="how the attack runs are trained (see `edgeguard evaluate --help`)")
    ap.add_argument("--workers", type=int, default=1, help="processes for --executor processes")
    ap.add_argument("--suite", default=None, help="an attack suite (name or file) besides --attacks")
    a = ap.parse_args()
    attacks = [] if a.attacks == "none" else a.attacks.split(",")
    rows = ["| method | setting | pair | seed | protect s | sparsity | source before→after | ΔS | target before→after "
            "| ST-D |" + "".join(f" SLC-AUC {x} |" for x in attacks),
            "|---" * (10 + len(attacks)) + "|"]
    drops, targets = [], []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        out = Path(a.out) / f"{a.method}_{a.setting}_{Path(a.source).stem}_{a.target}_s{seed}.safetensors"
        t = time.perf_counter()
        overrides = [f"seed={seed}", *flat_overrides(json.loads(a.config))]
        if a.method == "map":
            overrides.insert(0, f"setting={a.setting}")
        r = protect(a.method, a.source, out, target=a.target, overrides=overrides, device=a.device)
        secs = time.perf_counter() - t
        slc = ""
        if attacks:
            suite = get_suite(a.suite) if a.suite else None
            recipes = with_recipes(suite, [parse_attack(x) for x in attacks])
            cfg = EvalConfig(target=a.target, attacks=recipes, grid=parse_grid(a.grid), seeds=1, device=a.device,
                             workers=a.workers, executor=a.executor, suite=suite.name if suite else None,
                             search_trials=suite.trials if suite else 0)
            res = evaluate_model(out, cfg, out.with_suffix(".report")).to_dict()
            slc = " | ".join(f"{e['slc_auc'][0]:+.2f}" for e in res["attacks"][:len(attacks)])
            if res.get("suite"):
                slc += f" | robust {res['suite']['robust_slc_auc'][0]:+.2f}"
        tgt, src = r.accuracy(a.target), r.source
        tb, ta = tgt.before, tgt.after
        d = direct_metrics(src.before, src.after, tb, ta)
        ds = d["delta_s"]
        drops.append(ds)
        targets.append(ta * 100)
        std = "–" if d["st_d"] is None else f"{d['st_d']:.3f}"
        rows.append(f"| {a.method} | {a.setting if a.method == 'map' else '-'} | {Path(a.source).stem}→{a.target} | "
                    f"{seed} | {secs:.0f} | {r.sparsity * 100:.1f}% | {src.before * 100:.2f}→"
                    f"{src.after * 100:.2f} | {ds:.2f} | {tb * 100:.1f}→{ta * 100:.1f} | {std} |"
                    + (f" {slc} |" if slc else ""))
    if a.seeds > 1:
        (dm, dsd), (tm, tsd) = mean_std(drops), mean_std(targets)
        rows.append(f"| mean ± sd | | | {a.seeds} seeds | | | | {dm:.2f} ± {dsd:.2f} | →{tm:.1f} ± {tsd:.1f} | |"
                    + " |" * len(attacks))
    record(f"{a.method.upper()} protection and attack grid", rows)


if __name__ == "__main__":
    main()
