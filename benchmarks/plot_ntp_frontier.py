"""Plot NTP's trade-off on small_cnn MNIST→USPS: source accuracy after protection against SLC-AUC.

Reads benchmarks/ntp_frontier_small_cnn.csv (one row per measured run, copied from the tables in
benchmarks/RESULTS.md: run, family, source accuracy %, SLC-AUC on the 5-ratio screening grid) and writes
benchmarks/figures/ntp_frontier_small_cnn.png, with the issue's bar (ΔS ≤ 1 point, SLC-AUC ≤ −1.7) shaded.

    python benchmarks/plot_ntp_frontier.py
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCE_BEFORE = 98.34  # runs/mnist_small.safetensors on the MNIST test set


def main() -> None:
    rows = list(csv.DictReader((HERE / "ntp_frontier_small_cnn.csv").read_text().splitlines()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between([SOURCE_BEFORE - 1.0, 100], -3.0, -1.7, color="tab:green", alpha=0.15,
                    label="issue #6 bar (ΔS ≤ 1, SLC-AUC ≤ −1.7)")
    for family, marker in (("reference losses", "o"), ("simulated attack", "s"), ("control", "^")):
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        ax.scatter([float(r["source"]) for r in pts], [float(r["slc_auc"]) for r in pts], marker=marker,
                   s=40, label=family)
        for r in pts:
            ax.annotate(r["run"], (float(r["source"]), float(r["slc_auc"])), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("source (MNIST) accuracy after protection, %")
    ax.set_ylabel("SLC-AUC, direct-all/masked (lower = stronger)")
    ax.set_title("NTP on small_cnn, MNIST→USPS: every run measured (seed 0; sim8s1 = seed 1)")
    ax.set_ylim(-3.0, 2.0)
    ax.set_xlim(0, 100)
    ax.legend(fontsize=8, loc="upper left")
    out = HERE / "figures" / "ntp_frontier_small_cnn.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
