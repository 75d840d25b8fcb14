"""Drawing helpers shared by the CLI, the methods and the evaluation reports."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.fileio import atomic_path

from .errors import EdgeguardError


def image_grid(x: np.ndarray, path: str | os.PathLike, labels: list[str] | None = None, cols: int = 16,
               scale: int = 3) -> Path:
    """Write uint8 N×3×32×32 images as one PNG grid (nearest-neighbour upscaled) so a person can look; with
    `labels`, each tile's label is written under it."""
    from PIL import Image, ImageDraw

    path = Path(path)
    n = len(x)
    if n == 0:
        raise EdgeguardError("no images to draw")
    if labels is not None and len(labels) != n:
        raise EdgeguardError(f"{len(labels)} labels for {n} images")
    rows = -(-n // cols)
    tile_h = 34 * scale + (12 if labels is not None else 0)
    canvas = Image.new("RGB", (min(cols, n) * 34 * scale, rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0))).resize((32 * scale, 32 * scale),
                                                                                   Image.NEAREST)
        canvas.paste(tile, (c * 34 * scale + scale, r * tile_h + scale))
        if labels is not None:
            draw.text((c * 34 * scale + scale, r * tile_h + 33 * scale), str(labels[i])[:14], fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
