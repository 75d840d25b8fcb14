"""One image file → uint8 C×H×W at a model's input, the one decoder the host's folder loader and the device's
`predict` share, so a camera JPEG reaches the model through exactly the same resize and crop on both sides."""
from __future__ import annotations

from pathlib import Path

import numpy as np

RESIZE_POLICIES = ("plain", "center-crop")  # plain: stretch to H×W; center-crop: shorter side, then a centre crop


class ImageFileError(ValueError):
    """The file is missing or is not an image PIL can decode (the message names the file)."""


def crop_box(width: int, height: int, out_h: int, out_w: int, crop: float) -> tuple[int, int, int, int]:
    """The centre box (left, top, right, bottom) of a `width`×`height` image that a centre crop keeps: the
    largest box of the output's aspect ratio, scaled by `crop` (0.875 is the 256→224 ImageNet convention)."""
    scale = min(width / out_w, height / out_h) * crop
    bw, bh = max(1, round(out_w * scale)), max(1, round(out_h * scale))
    left, top = (width - bw) // 2, (height - bh) // 2
    return left, top, left + bw, top + bh


def decode_image(path: str | Path, shape: tuple[int, int, int] | list[int], resize: str = "plain",
                 crop: float = 1.0) -> np.ndarray:
    """Decode `path` to uint8 (C, H, W) for an input of `shape`: RGB (C = 3) or grey (C = 1), bilinear with
    PIL's antialiasing when shrinking."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = (int(s) for s in shape)
    if resize not in RESIZE_POLICIES:
        raise ImageFileError(f"unknown resize policy {resize!r}; choose one of {', '.join(RESIZE_POLICIES)}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if c == 3 else "L")
            if im.size != (w, h):
                box = crop_box(im.width, im.height, h, w, crop) if resize == "center-crop" else None
                im = im.resize((w, h), Image.BILINEAR, box=box)
            a = np.asarray(im, np.uint8)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageFileError(f"{path}: not a readable image ({e})") from None
    return np.ascontiguousarray(a.transpose(2, 0, 1) if a.ndim == 3 else a[None])
