"""The packed-mask bit format, shared by the host (edgeguard.masks) and the device (integrity checks).

A mask set is an ordered list of (name, shape, bool array). Packing concatenates the flattened arrays in
that order and packs them with numpy.packbits (big-endian bit order, padding bits 0). The layout (names and
shapes) travels beside the bits, in the artifact's metadata or the bundle's manifest.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

Layout = list[tuple[str, tuple[int, ...]]]


def pack(masks: Mapping[str, np.ndarray]) -> tuple[bytes, Layout]:
    """Pack bool arrays in sorted-name order; returns the bits and the layout needed to unpack them."""
    names = sorted(masks)
    layout: Layout = [(n, tuple(int(s) for s in np.shape(masks[n]))) for n in names]
    if not names:
        return b"", layout
    flat = np.concatenate([np.asarray(masks[n], dtype=bool).ravel() for n in names])
    return np.packbits(flat).tobytes(), layout


def unpack(bits: bytes, layout: Sequence[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """Inverse of pack; raises ValueError when the bit count does not fit the layout."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    total = sum(sizes)
    expected = (total + 7) // 8
    if len(bits) != expected:
        raise ValueError(f"packed mask has {len(bits)} bytes, the layout needs {expected}")
    flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=total).astype(bool)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for (name, shape), size in zip(layout, sizes):
        out[name] = flat[offset : offset + size].reshape(tuple(int(s) for s in shape))
        offset += size
    return out


def digest(bits: bytes) -> str:
    """sha256 of the packed bits: the mask's identity everywhere (artifact, manifest, runtime)."""
    return hashlib.sha256(bits).hexdigest()


def zero_violations(masks: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> dict[str, int]:
    """For each masked tensor, how many masked-out entries are not exactly 0 ("mask zeros ⊆ weight zeros")."""
    bad: dict[str, int] = {}
    for name, mask in masks.items():
        if name not in weights:
            bad[name] = -1
            continue
        w = np.asarray(weights[name])
        if w.shape != mask.shape:
            bad[name] = -1
            continue
        n = int(np.count_nonzero(w[~mask]))
        if n:
            bad[name] = n
    return bad
