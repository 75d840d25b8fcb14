"""The Domain record and the shape every loader brings its images to: uint8 (N, 3, 32, 32)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
# One fixed normalisation for every domain: x = (pixel / 255 - 0.5) / 0.5. Stored in artifacts and manifests.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
DIGITS = tuple(str(i) for i in range(10))


@dataclass
class Domain:
    """A named image domain: uint8 images (N, 3, 32, 32), int64 labels, class names, fixed train/test split."""

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


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """Bring uint8 images (N, H, W) or (N, C, H, W) with C in {1, 3} to (N, 3, 32, 32) uint8 (bilinear)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N,H,W) or (N,1|3,H,W), got shape {x.shape}")
    if x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE) and len(x):
        import torch
        import torch.nn.functional as F

        out = []
        for start in range(0, len(x), 4096):
            t = torch.from_numpy(np.array(x[start : start + 4096])).float()
            t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > IMAGE_SIZE)
            out.append(t.round().clamp(0, 255).to(torch.uint8).numpy())
        x = np.concatenate(out)
    elif len(x) == 0:
        x = np.zeros((0, x.shape[1], IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
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
