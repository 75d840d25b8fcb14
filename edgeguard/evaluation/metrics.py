"""Direct-use metrics: source and target accuracy before/after protection, their drops, and ST-D.

ST-D = ΔS / ΔT is MAP's balance metric as we reconstruct it (shared/methods/map.md §3): lower is better,
negative when the source accuracy rose. It is undefined for ΔT ≤ 0 (protection did not lower the target),
reported as None then. Always read it beside ΔS and ΔT.
"""
from __future__ import annotations

import math


def direct_metrics(source_before: float, source_after: float, target_before: float,
                   target_after: float) -> dict[str, float | None]:
    ds = (source_before - source_after) * 100.0
    dt = (target_before - target_after) * 100.0
    return {
        "source_before": source_before, "source_after": source_after,
        "target_before": target_before, "target_after": target_after,
        "delta_s": ds, "delta_t": dt,
        "st_d": ds / dt if dt > 0 and math.isfinite(ds / dt) else None,
    }


def mean_std(values) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return m, math.sqrt(var)
