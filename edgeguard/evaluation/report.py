"""Reports: report.json, report.md and one PNG per attack (accuracy vs. number of target samples, log x)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.fileio import atomic_path, atomic_write_text


def _fmt(ms) -> str:
    m, s = ms
    return f"{m:+.3f} ± {s:.3f}"


def plot_attack(entry: dict, title: str, path: Path, method: str = "protected") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.asarray(entry["n"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    first = "evaluated model (no protection)" if method in ("none", None) else f"protected ({method})"
    styles = [("protected", first, "#d62728"), ("unprotected", "unprotected (source model)", "#1f77b4"),
              ("scratch", "from scratch", "#7f7f7f")]
    for key, label, color in styles:
        if key not in entry:
            continue
        a = np.asarray(entry[key], dtype=float) * 100
        mean = a.mean(0)
        ax.plot(n, mean, marker="o", ms=4, color=color, label=label, lw=2 if key == "protected" else 1.5,
                ls="--" if key == "scratch" else "-")
        if a.shape[0] > 1:
            ax.fill_between(n, a.min(0), a.max(0), color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("target samples the attacker fine-tunes on (log scale)")
    ax.set_ylabel("target test accuracy after the attack (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    slc = entry["slc_auc"][0]
    verdict = "worse than scratch" if slc < 0 else "better than scratch"
    ax.set_title(f"{title}\n{entry['attack']}: SLC-AUC {slc:+.2f} ({verdict})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(results, indent=2))
    title = f"{results['arch']} ({results['method']}) {results['source_domain']} → {results['target']}"
    lines = [f"# Fine-tuning attack report: {title}", "",
             f"- model: `{results['model']}` (sparsity {results['sparsity'] * 100:.1f} %)",
             f"- seeds: {results['seeds']}; grid (ratios of the target train set): {results['grid']}",
             f"- target accuracy without fine-tuning: {results['target_accuracy_direct'] * 100:.2f} %"]
    if results.get("source_accuracy") is not None:
        lines.append(f"- source accuracy: {results['source_accuracy'] * 100:.2f} %")
    d = results.get("direct")
    if d:
        std = f"{d['st_d']:.4f}" if d["st_d"] is not None else "undefined (ΔT ≤ 0)"
        lines += ["", "## Direct use", "", "| source before | source after | ΔS (pt) | target before | target after | "
                  "ΔT (pt) | ST-D |", "|---|---|---|---|---|---|---|",
                  f"| {d['source_before'] * 100:.2f} | {d['source_after'] * 100:.2f} | {d['delta_s']:+.2f} | "
                  f"{d['target_before'] * 100:.2f} | {d['target_after'] * 100:.2f} | {d['delta_t']:+.2f} | {std} |"]
    lines += ["", "## Fine-tuning attacks", "",
              "SLC-AUC = area of accuracy over ln r, protected minus scratch (< 0: worse than training from scratch).",
              "", "| attack | SLC-AUC | normalised | unprotected SLC-AUC | plot |", "|---|---|---|---|---|"]
    for e in results["attacks"]:
        png = f"attack_{e['attack'].replace('/', '_')}.png"
        plot_attack(e, title, out_dir / png, results.get("method", "protected"))
        unp = _fmt(e["unprotected_slc_auc"]) if "unprotected_slc_auc" in e else "–"
        lines.append(f"| {e['attack']} | {_fmt(e['slc_auc'])} | {_fmt(e['slc_auc_normalised'])} | {unp} | "
                     f"![{e['attack']}]({png}) |")
    for e in results["attacks"]:
        lines += ["", f"### {e['attack']}: accuracy (%) by number of target samples", "",
                  "| n | " + " | ".join(str(v) for v in e["n"]) + " |", "|---" * (len(e["n"]) + 1) + "|"]
        for key in ("protected", "unprotected", "scratch"):
            if key in e:
                mean = np.asarray(e[key]).mean(0) * 100
                lines.append(f"| {key} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    lines += ["", f"Wall time {results.get('wall_seconds', 0):.1f} s on {results.get('device')}."]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
