"""Reports: report.json, report.md and one PNG per attack (accuracy vs. number of target samples, log x)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from runtime.fileio import atomic_path, atomic_write_text

from .result import Curves, EvalResult


def _fmt(ms) -> str:
    m, s = ms
    return f"{m:+.3f} ± {s:.3f}"


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def _finish(fig, ax, title: str, path: Path, legend_size: int) -> None:
    """The learning-curve axes every report figure shares, then an atomic PNG write."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel("target samples the attacker fine-tunes on (log scale)")
    ax.set_ylabel("target test accuracy after the attack (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=legend_size)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_attack(entry: Curves, title: str, path: Path, method: str = "protected") -> None:
    n = np.asarray(entry.n, dtype=float)
    fig, ax = _figure((6.4, 4.2))
    first = "evaluated model (no protection)" if method in ("none", None) else f"protected ({method})"
    styles = [("protected", first, "#d62728"), ("unprotected", "unprotected (source model)", "#1f77b4"),
              ("scratch", "from scratch", "#7f7f7f")]
    for key, label, color in styles:
        if entry.curve(key) is None:
            continue
        a = np.asarray(entry.curve(key), dtype=float) * 100
        mean = a.mean(0)
        ax.plot(n, mean, marker="o", ms=4, color=color, label=label, lw=2 if key == "protected" else 1.5,
                ls="--" if key == "scratch" else "-")
        if a.shape[0] > 1:
            ax.fill_between(n, a.min(0), a.max(0), color=color, alpha=0.15)
    slc = entry.slc_auc[0]
    verdict = "worse than scratch" if slc < 0 else "better than scratch"
    _finish(fig, ax, f"{title}\n{entry.attack}: SLC-AUC {slc:+.2f} ({verdict})", path, 8)


def _png_name(attack: str) -> str:
    return "attack_" + re.sub(r"[^A-Za-z0-9._-]+", "_", attack).strip("_") + ".png"


def plot_suite(results: EvalResult, title: str, path: Path) -> None:
    """The attacker's best recipe: both envelopes (and the unprotected model's) in bold, each recipe thin, the
    area between the protected and the scratch envelope shaded."""
    suite = results.suite
    entries = results.attacks
    n = np.asarray(entries[0].n, dtype=float)
    fig, ax = _figure((7.2, 4.8))
    for e in entries:
        ax.plot(n, np.asarray(e.protected).mean(0) * 100, color="#d62728", lw=0.7, alpha=0.45)
        ax.plot(n, np.asarray(e.scratch).mean(0) * 100, color="#7f7f7f", lw=0.7, alpha=0.45, ls="--")
    prot = np.asarray(suite.envelopes["protected"]).mean(0) * 100
    scr = np.asarray(suite.envelopes["scratch"]).mean(0) * 100
    ax.fill_between(n, prot, scr, where=prot >= scr, color="#d62728", alpha=0.15, interpolate=True,
                    label="protected above scratch")
    ax.fill_between(n, prot, scr, where=prot < scr, color="#2ca02c", alpha=0.15, interpolate=True,
                    label="protected below scratch")
    ax.plot(n, prot, color="#d62728", lw=2.5, marker="o", ms=4, label="protected: best recipe per ratio")
    ax.plot(n, scr, color="#404040", lw=2.5, ls="--", marker="s", ms=4, label="scratch: best recipe per ratio")
    if "unprotected" in suite.envelopes:
        ax.plot(n, np.asarray(suite.envelopes["unprotected"]).mean(0) * 100, color="#1f77b4", lw=2.5,
                label="unprotected: best recipe per ratio")
    if suite.floor_curve is not None:
        ax.plot(n, np.asarray(suite.floor_curve).mean(0) * 100, color="#9467bd", lw=2, ls=":", marker="^",
                ms=4, label="floor: starting over on the source sample (no file)")
    m, sd = suite.robust_slc_auc
    _finish(fig, ax, f"{title}\nsuite {suite.name} ({len(entries)} recipes, thin lines): robust SLC-AUC "
                     f"{m:+.2f} ± {sd:.2f}", path, 7)


def verdict(results: EvalResult) -> str:
    """One line: the robust value when a suite ran, else the single recipe's."""
    suite = results.suite
    if suite:
        m, sd = suite.robust_slc_auc
        line = (f"robust SLC-AUC {m:+.3f} ± {sd:.3f} over {len(suite.recipes)} recipes of suite "
                f"{suite.name} ({'worse' if m < 0 else 'better'} than scratch at its best)")
        if suite.floor_slc_auc is not None:
            line += (f"; floor {suite.floor_slc_auc[0]:+.3f} (the attacker's best without the file, from the "
                     f"suite's source sample: no protection scores under it)")
        return line
    e = results.attacks[0]
    return f"SLC-AUC {e.slc_auc[0]:+.3f} ± {e.slc_auc[1]:.3f} ({e.attack})"


def write_report(results: EvalResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(results.to_dict(), indent=2))
    r = results
    title = f"{r.arch} ({r.method}) {r.source_domain} → {r.target}"
    lines = [f"# Fine-tuning attack report: {title}", "",
             f"- model: `{r.model}` (sparsity {r.sparsity * 100:.1f} %)",
             f"- seeds: {r.seeds}; grid (ratios of the target train set): {r.grid}",
             f"- target accuracy without fine-tuning: {r.target_accuracy_direct * 100:.2f} %"]
    if r.source_accuracy is not None:
        lines.append(f"- source accuracy: {r.source_accuracy * 100:.2f} %")
    lines += _direct_lines(r.direct)
    lines += _under_attack_lines(r.direct_under_attack)
    if r.suite:
        plot_suite(r, title, out_dir / "suite.png")
        lines += _suite_lines(r)
    lines += ["", "## Fine-tuning attacks", "",
              "SLC-AUC = area of accuracy over ln r, protected minus scratch (< 0: worse than training from scratch).",
              "", "| attack | SLC-AUC | normalised | unprotected SLC-AUC | plot |", "|---|---|---|---|---|"]
    for e in r.attacks:
        png = _png_name(e.attack)
        plot_attack(e, title, out_dir / png, r.method or "protected")
        unp = _fmt(e.unprotected_slc_auc) if e.unprotected_slc_auc is not None else "–"
        lines.append(f"| {e.attack} | {_fmt(e.slc_auc)} | {_fmt(e.slc_auc_normalised)} | {unp} | ![{e.attack}]({png}) |")
    for e in r.attacks:
        lines += ["", f"### {e.attack}: accuracy (%) by number of target samples", "",
                  "| n | " + " | ".join(str(v) for v in e.n) + " |", "|---" * (len(e.n) + 1) + "|"]
        for key in ("protected", "unprotected", "scratch"):
            if e.curve(key) is not None:
                mean = np.asarray(e.curve(key)).mean(0) * 100
                lines.append(f"| {key} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    lines += ["", f"Wall time {r.wall_seconds:.1f} s on {r.device}."]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _direct_lines(d: dict | None) -> list[str]:
    if not d:
        return []
    std = f"{d['st_d']:.4f}" if d["st_d"] is not None else "undefined (ΔT ≤ 0)"
    return ["", "## Direct use", "", "| source before | source after | ΔS (pt) | target before | target after | "
            "ΔT (pt) | ST-D |", "|---|---|---|---|---|---|---|",
            f"| {d['source_before'] * 100:.2f} | {d['source_after'] * 100:.2f} | {d['delta_s']:+.2f} | "
            f"{d['target_before'] * 100:.2f} | {d['target_after'] * 100:.2f} | {d['delta_t']:+.2f} | {std} |"]


def _under_attack_lines(u: dict | None) -> list[str]:
    if not u:
        return []
    lines = ["", "## Direct use under input-space attacks", "",
             "The weights as shipped, an input adapter trained on the attacker's n target images in front of them "
             "(reprogramming; restyled from a few source images first where the recipe says so): target accuracy "
             "(%) against plain direct use.", "",
             "| model | attack | plain | " + " | ".join(f"n={n}" for n in u["n"]) + " |",
             "|---" * (len(u["n"]) + 3) + "|"]
    for kind in ("protected", "unprotected"):
        plain = u["plain"].get(kind)
        for name, curves in u["attacks"].items():
            if kind in curves and plain is not None:
                lines.append(f"| {kind} | {name} | {plain * 100:.1f} | "
                             + " | ".join(f"{v * 100:.1f}" for v in curves[kind]) + " |")
    return lines


def _suite_lines(r: EvalResult) -> list[str]:
    suite, n = r.suite, r.attacks[0].n
    lines = ["", f"## Suite {suite.name}: the attacker's best recipe", "", f"**{verdict(r)}**", "",
             "At each ratio the envelope is the best accuracy any recipe reached; scratch training gets its "
             "best recipe too. Both envelopes select on the test set, which favours the attacker and the "
             "scratch baseline alike.", "", "![suite](suite.png)", "",
             "| n | " + " | ".join(str(v) for v in n) + " |", "|---" * (len(n) + 1) + "|"]
    for kind in ("protected", "unprotected", "scratch"):
        if kind in suite.envelopes:
            mean = np.asarray(suite.envelopes[kind]).mean(0) * 100
            lines.append(f"| {kind} envelope (%) | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
            lines.append(f"| {kind} winner | " + " | ".join(suite.winners[kind]) + " |")
    if suite.floor_curve is not None:
        mean = np.asarray(suite.floor_curve).mean(0) * 100
        lines.append("| floor: no file, source sample (%) | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    return lines
