"""SLC-AUC: area under the sample-wise learning curve (accuracy 0..1 over ln r), protected minus scratch.

Below 0 means fine-tuning the protected model is worse than training from nothing. The normalised value
divides by ln(r_max / r_min), so it reads as a mean accuracy difference over the log axis.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import EdgeguardError

DEFAULT_GRID = (0.001, 0.002, 0.005, 0.008, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


def curve_auc(ratios: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoid area of accuracy over ln r (natural log, no normalisation: NTP's `log_auc`)."""
    r = np.asarray(ratios, dtype=float)
    a = np.asarray(accuracies, dtype=float)
    if r.shape != a.shape or r.ndim != 1 or len(r) < 2:
        raise EdgeguardError("a learning curve needs at least two (ratio, accuracy) points of equal count")
    if np.any(r <= 0) or np.any(np.diff(r) <= 0):
        raise EdgeguardError("sample ratios must be positive and strictly increasing")
    x = np.log(r)
    return float(np.sum((x[1:] - x[:-1]) * (a[1:] + a[:-1]) / 2.0))


def slc_auc(ratios: Sequence[float], protected: Sequence[float], scratch: Sequence[float]) -> dict[str, float]:
    auc_p = curve_auc(ratios, protected)
    auc_s = curve_auc(ratios, scratch)
    span = float(np.log(ratios[-1] / ratios[0]))
    return {"auc": auc_p, "scratch_auc": auc_s, "slc_auc": auc_p - auc_s,
            "slc_auc_normalised": (auc_p - auc_s) / span}


def parse_grid(text: str | Sequence[float] | None) -> tuple[float, ...]:
    if text is None:
        return DEFAULT_GRID
    try:
        vals = [float(v) for v in text.split(",")] if isinstance(text, str) else [float(v) for v in text]
    except (TypeError, ValueError):
        raise EdgeguardError(f"--grid {text!r}: expected comma-separated numbers, e.g. 0.01,0.1,1.0") from None
    grid = tuple(sorted(set(vals)))
    if len(grid) < 2 or not all(np.isfinite(grid)) or grid[0] <= 0 or grid[-1] > 1:
        raise EdgeguardError(f"--grid needs at least two ratios in (0, 1], got {text!r}")
    return grid
