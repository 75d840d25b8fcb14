"""Hardening (issue 19): harden input models, then judge each by the robust suite (paper recipe beside it).

For every input file and every `--weights` value: `edgeguard harden` (wall time), the source drop against the
dense `--source-model` (eval mode, the shipped file), and `edgeguard evaluate --suite robust`. Each row goes
to benchmarks/harden_frontier.csv (one line per hardened file; earlier rows are kept) and the table to
RESULTS.md; `--plot` redraws benchmarks/figures/harden_frontier.png from the CSV (unhardened inputs are
points too, with weight 0).
    python benchmarks/bench_harden.py runs/ntp_cnn32_usps.safetensors --source-model runs/mnist_cnn32.safetensors \
        --target usps --weights 1 --grid 0.001,0.005,0.01,0.05,0.2 --set outer_steps=200
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from _record import record

from edgeguard.artifact import read_card
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import parse_grid
from edgeguard.evaluation.suites import get_suite
from edgeguard.protect import protect

HERE = Path(__file__).resolve().parent
CSV = HERE / "harden_frontier.csv"
FIELDS = ["model", "input_method", "weight", "source_model_acc", "source_acc", "source_drop", "paper_slc_auc",
          "robust_slc_auc", "robust_winners", "harden_seconds", "settings", "meta_gradient"]


def judge(path: Path, target: str, grid, device: str, reports: Path, suite_name: str = "robust") -> dict:
    suite = get_suite(suite_name)
    cfg = EvalConfig(target=target, attacks=list(suite.recipes), grid=grid, device=device, suite=suite.name)
    res = evaluate_model(path, cfg, reports / f"robust_{path.stem}").to_dict()
    paper = next(e["slc_auc"][0] for e in res["attacks"] if e["attack"] == "paper")
    suite_res = res["suite"] or {"robust_slc_auc": [paper], "protected_winner": ["paper"]}  # a one-recipe suite
    return {"source_acc": res["source_accuracy"], "paper_slc_auc": paper,
            "robust_slc_auc": suite_res["robust_slc_auc"][0],
            "robust_winners": " ".join(suite_res["protected_winner"])}


def _changed(config: dict) -> dict:
    """The hardening settings that differ from the defaults."""
    import dataclasses

    from edgeguard.methods.harden import HardenConfig

    default = dataclasses.asdict(HardenConfig())
    return {k: v for k, v in config.items() if default.get(k) != v}


def _meta_gradient(method_config: dict) -> str:
    """How a hardened file's meta-gradient was taken: "exact ≤ N images" (files hardened while issue 31's
    exact meta-gradients are on: `exact_images` > 0) or "first order" (`exact_images=0`, and all earlier files)."""
    n = int(method_config.get("exact_images", 0))
    return f"exact ≤ {n} images" if n else "first order"


def _series(r: dict) -> str:
    """A frontier line: the input method, and for hardened rows how the meta-gradient was taken."""
    name = "dense input" if r["input_method"] == "none" else f"{r['input_method'].upper()} input"
    return name if float(r["weight"]) == 0 else f"{name} + harden ({r.get('meta_gradient') or 'first order'})"


def plot(floor: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(CSV.open()))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in sorted({_series(r) for r in rows}):
        pts = sorted((float(r["weight"]), float(r["source_acc"]) * 100, float(r["robust_slc_auc"]))
                     for r in rows if _series(r) == label)
        ax.plot([p[2] for p in pts], [p[1] for p in pts], "o", label=label)  # settings differ: points, not a line
        for w, s, a in pts:
            ax.annotate(f"w={w:g}", (a, s), fontsize=7, textcoords="offset points", xytext=(4, 3))
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    refs = {float(r["source_model_acc"]) for r in rows if r["source_model_acc"]}
    if refs:  # the source bar: at most 1 point below the dense source model (the best of them, if retrained)
        ax.axhline(max(refs) * 100 - 1, color="red", lw=0.8, ls=":", label="source bar (drop 1.0)")
    if floor is not None:  # bench_floor.py: what the source-aided attacker's sample is worth without the file
        ax.axvline(floor, color="#9467bd", lw=1, ls="-.", label=f"floor: no file, 1 % source ({floor:+.2f})")
    ax.set_xlabel("robust SLC-AUC (robust suite; < 0: worse than scratch)")
    ax.set_ylabel("source accuracy, eval mode, shipped file (%)")
    ax.set_title("Hardening frontier (w: suppression weight; w=0: the input)")
    ax.legend(fontsize=8)
    out = HERE / "figures" / "harden_frontier.png"
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--source-model", required=False)
    ap.add_argument("--target", default="usps")
    ap.add_argument("--weights", default="1", help="suppression weights to harden with (0: judge the input)")
    ap.add_argument("--grid", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reports", default=str(HERE.parent / "runs"))
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--floor", type=float, default=None,
                    help="with --plot: the floor measured by bench_floor.py (restart-source), drawn as a line")
    ap.add_argument("--suite", default="robust", help="the suite that judges each file")
    ap.add_argument("--csv", default=str(CSV), help="the frontier table to update")
    ap.add_argument("--tag", default="", help="suffix of the hardened files' names (several settings per weight)")
    a = ap.parse_args()
    grid, reports = parse_grid(a.grid), Path(a.reports)
    ref = read_card(a.source_model).source_accuracy.after if a.source_model else None
    table = ["| input | weight | source acc. (drop) | paper SLC-AUC | robust SLC-AUC | winners per ratio | harden s |",
             "|---|---|---|---|---|---|---|"]
    new = []
    for model in map(Path, a.models):
        card = read_card(model)
        for w in (float(v) for v in a.weights.split(",")):
            if w == 0:
                out, secs = model, 0.0
            else:
                out = reports / f"{model.stem}_h{w:g}{a.tag}.safetensors"
                if not out.exists():  # an existing file is judged again, with the settings its card records
                    protect("harden", model, out, target=a.target,
                            overrides=[f"suppress_weight={w}", *a.overrides], device=a.device, resume=True)
                secs = float(read_card(out).protection["seconds"])
            j = judge(out, a.target, grid, a.device, reports, a.suite)
            drop = (ref - j["source_acc"]) * 100 if ref is not None else float("nan")
            row = {"model": out.name, "input_method": card.method, "weight": w,
                   "source_model_acc": ref, "harden_seconds": round(secs, 1), "source_drop": round(drop, 2),
                   "settings": json.dumps(_changed(read_card(out).method_config) if w else {}),
                   "meta_gradient": _meta_gradient(read_card(out).method_config) if w else "", **j}
            new.append(row)
            table.append(f"| {model.name} ({card.method}) | {w:g} | {j['source_acc'] * 100:.2f} % (drop {drop:.2f}) | "
                         f"{j['paper_slc_auc']:+.2f} | **{j['robust_slc_auc']:+.2f}** | {j['robust_winners']} | "
                         f"{secs:.0f} |")
            print(table[-1], flush=True)
    if new:
        csv_path = Path(a.csv)
        old = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
        keep = [r for r in old if r["model"] not in {n["model"] for n in new}]
        with csv_path.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS)
            wr.writeheader()
            wr.writerows(keep + new)
        record(f"Hardening, {a.target}, grid {a.grid or 'default'}, 1 seed", table)
    if a.plot:
        print(plot(a.floor))


if __name__ == "__main__":
    main()
