"""The Domain record and how a loader brings decoded arrays to a model's input (uint8 N×C×H×W)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..inputspec import DIGITS_INPUT, InputSpec

DIGITS = tuple(str(i) for i in range(10))


@dataclass
class Domain:
    """A named image domain at one model input: uint8 images (N, C, H, W), int64 labels, class names, a fixed
    train/test split. Large folders hold memory-mapped arrays (`registry`), read a batch at a time."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        return {"train": int(len(self.train_y)), "test": int(len(self.test_y))}

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Domain:
        """The first n images of each split (splits are already in a fixed shuffled order)."""
        return Domain(
            self.name,
            self.train_x[:n_train],
            self.train_y[:n_train],
            self.test_x[:n_test],
            self.test_y[:n_test],
            self.classes,
        )


def to_input(images: np.ndarray, spec: InputSpec = DIGITS_INPUT) -> np.ndarray:
    """Bring uint8 arrays (N, H, W) or (N, C, H, W) with C in {1, 3} to `spec`'s (N, C, H, W): bilinear (antialiased
    when shrinking), grey replicated to RGB; a centre-crop policy crops before resizing, as the file decoder does."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N,H,W) or (N,1|3,H,W), got shape {x.shape}")
    c, h, w = spec.shape
    if spec.resize == "center-crop" and x.shape[2:] != (h, w) and len(x):
        from runtime.imagefile import crop_box

        left, top, right, bottom = crop_box(x.shape[3], x.shape[2], h, w, spec.crop)
        x = x[:, :, top:bottom, left:right]
    if x.shape[2:] != (h, w) and len(x):
        import torch
        import torch.nn.functional as F

        out = []
        for start in range(0, len(x), 4096):
            t = torch.from_numpy(np.array(x[start : start + 4096])).float()
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > w)
            out.append(t.round().clamp(0, 255).to(torch.uint8).numpy())
        x = np.concatenate(out)
    elif len(x) == 0:
        x = np.zeros((0, x.shape[1], h, w), np.uint8)
    if x.shape[1] != c:
        x = np.repeat(x, 3, axis=1) if c == 3 else np.round(x.mean(1, keepdims=True)).astype(np.uint8)
    return np.ascontiguousarray(x, dtype=np.uint8)


def split_by_index(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed 80/20 split of a set that comes in one part: every fifth image (index % 5 == 4) is test."""
    idx = np.arange(len(y))
    test = idx % 5 == 4
    return x[~test], y[~test], x[test], y[test]


def fixed_shuffle(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic permutation so that `Domain.subset` and prefixes are class-mixed."""
    perm = np.random.default_rng(seed).permutation(len(y))
    return x[perm], y[perm]
