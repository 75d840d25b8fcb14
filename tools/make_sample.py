"""Write edgeguard/data/digits_sample.npz: the embedded demo/test sample, from the shared real data.

    EDGEGUARD_DATA_ROOT=../shared/data-raw python tools/make_sample.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgeguard.domains import get_domain

SIZES = {"mnist": (2000, 500), "usps": (2000, 500), "mnist_m": (1000, 300)}


def main() -> None:
    out = {}
    for name, (ntr, nte) in SIZES.items():
        d = get_domain(name)
        grey = name != "mnist_m"
        for part, x, y, n in (("train", d.train_x, d.train_y, ntr), ("test", d.test_x, d.test_y, nte)):
            xs = x[:n, :1] if grey else x[:n]
            out[f"{name}_{part}_x"] = np.ascontiguousarray(xs)
            out[f"{name}_{part}_y"] = y[:n].astype(np.uint8)
    path = Path(__file__).resolve().parents[1] / "edgeguard" / "data" / "digits_sample.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
