"""int8 QDQ top-1 agreement with fp32 on a bundle's validation samples, for a model file (or a magnitude-masked
copy of it, the test fixture's recipe)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _record import record

from edgeguard.build import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, nargs="+", default=[300, 1000])
    a = ap.parse_args()
    rows = ["| model | samples | top-1 agreement int8 vs fp32 | fp32 accuracy on the samples |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.samples:
            r = build(a.model, Path(tmp) / f"b{n}", samples=n, precision="int8")
            acc = next(iter(r["accuracy"].values()))
            rows.append(f"| {Path(a.model).name} | {n} | {r['int8_top1_agreement'] * 100:.2f} % | {acc * 100:.1f} % |")
    record("int8 QDQ agreement", rows)


if __name__ == "__main__":
    main()
