"""The robust suite (or any suite) for a list of model files, side by side with their paper-recipe SLC-AUC.

A report folder that already holds finished runs is resumed (nothing retrained) and its first run's wall time
is kept, so the table can be re-made from `edgeguard evaluate --suite` runs done earlier.
    python benchmarks/bench_robust_suite.py runs/mnist_small.safetensors runs/map_usps.safetensors \
        --target usps --grid 0.001,0.002,0.005,0.01,0.05,0.1,0.2 --executor processes --workers 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _record import record

from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid
from edgeguard.evaluation.suites import get_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--target", default="usps")
    ap.add_argument("--suite", default="robust")
    ap.add_argument("--grid", default=None)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reports", default="runs", help="report folders go to REPORTS/<suite>_<model stem>")
    a = ap.parse_args()
    suite = get_suite(a.suite)
    rows = [f"| model | method | source acc. | paper SLC-AUC | robust SLC-AUC ({suite.name}, {len(suite.recipes)} "
            "recipes) | best recipe of the protected model per ratio | strongest single recipe (its SLC-AUC) | wall s |",
            "|---|---|---|---|---|---|---|---|"]
    direct = ["| model | input attack | plain direct use | under attack, by n |", "|---|---|---|---|"]
    under, share = None, []
    for model in a.models:
        rep = _report_dir(Path(a.reports), suite.name, model)
        earlier = rep / "report.json"
        first = _report_of(earlier, model)
        first_wall = first.get("wall_seconds") if first else None
        cfg = EvalConfig(target=a.target, attacks=list(suite.recipes), grid=parse_grid(a.grid), seeds=a.seeds,
                         device=a.device, executor=a.executor, workers=a.workers, suite=suite.name,
                         search_trials=suite.trials)
        res = evaluate_model(model, cfg, rep).to_dict()
        s = res["suite"]
        per = s["per_recipe_slc_auc"]
        paper = next((e["slc_auc"] for e in res["attacks"] if e["attack"] == "paper"), None)
        best = max(per, key=lambda k: per[k][0])
        wall = first_wall if first_wall is not None else res["wall_seconds"]
        src = res["source_accuracy"]
        rows.append(f"| {Path(model).name} | {res['method']} | {src * 100:.2f} % | "
                    f"{paper[0]:+.2f} | **{s['robust_slc_auc'][0]:+.2f} ± {s['robust_slc_auc'][1]:.2f}** | "
                    f"{', '.join(s['protected_winner'])} | {best} {per[best][0]:+.2f} | {wall:.0f} |")
        print(rows[-1], flush=True)
        if suite.name != "robust":
            share.append(_against_robust(model, wall, Path(a.reports)))
        under = res.get("direct_under_attack")
        if under:
            for name, curves in under["attacks"].items():
                direct.append(f"| {Path(model).name} | {name} | {under['plain']['protected'] * 100:.1f} | "
                              + ", ".join(f"{v * 100:.1f}" for v in curves["protected"]) + " |")
    if share:
        rows += ["", "Cost against the robust suite (wall time of this suite's evaluation against that of "
                 "REPORTS/robust_<model>; both must start from an empty cache to compare): " + "; ".join(share)]
    if len(direct) > 2:
        rows += ["", "Direct use under input-space attacks (target accuracy %, the weights as shipped; n = "
                 f"{', '.join(str(n) for n in under['n'])}):", "", *direct]
    record(f"Suite {suite.name} per model, {a.target}, grid {a.grid or 'default'}, {a.seeds} seed(s)", rows)


def _report_dir(reports: Path, suite: str, model: str) -> Path:
    """REPORTS/<suite>_<model stem>: where a suite's evaluation of a model goes (and is resumed from)."""
    return reports / f"{suite}_{Path(model).stem}"


def _report_of(path: Path, model: str) -> dict | None:
    """The report at `path` if it is this model file's: two models with one stem (runs/a/m, runs/b/m) share a
    folder name, and one's wall time must not be quoted for the other."""
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    return rep if Path(rep.get("model", "")).resolve() == Path(model).resolve() else None


def _against_robust(model: str, wall: float, reports: Path) -> str:
    """This suite's wall time over the robust suite's on the same model (REPORTS/robust_<stem>/report.json).
    Wall time, not summed run-seconds: a stack's runs share its time, and the pre phases run outside any run."""
    robust = _report_dir(reports, "robust", model) / "report.json"
    earlier = _report_of(robust, model)
    if earlier is None:
        return f"{Path(model).name}: no robust report of this model at {robust} to compare with"
    base = earlier["wall_seconds"]
    return f"{Path(model).name} {wall:.0f} / {base:.0f} s = {wall / base:.2f}×"


if __name__ == "__main__":
    main()
