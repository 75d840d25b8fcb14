"""The input a model expects, which belongs to the model (its card) and not to the data: size, channels,
normalisation and how a frame of another size is brought to it. Loaders decode at it, the training loop
normalises with it, export and the device runtime read it from the card."""
from __future__ import annotations

from dataclasses import dataclass, replace

from runtime.imagefile import RESIZE_POLICIES

from .errors import EdgeguardError


@dataclass(frozen=True)
class InputSpec:
    """uint8 C×H×W images, normalised as (x·scale − mean)/std per channel; frames of another size are brought
    to H×W by `resize` ("plain" stretches; "center-crop" scales the shorter side and keeps a centre box that
    is `crop` of it)."""

    shape: tuple[int, int, int] = (3, 32, 32)
    dtype: str = "uint8"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    scale: float = 1 / 255.0
    resize: str = "plain"
    crop: float = 1.0

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def key(self) -> str:
        """What decoded pixels depend on (size and resize policy), for cache keys."""
        c, h, w = self.shape
        return f"{c}x{h}x{w}-{self.resize}" + (f"{self.crop:g}" if self.resize == "center-crop" else "")


DIGITS_INPUT = InputSpec()  # the 32-px digits models: grey replicated to RGB, mean = std = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIZE, MAX_SIZE = 16, 1024


def make_input(size: int | tuple[int, int] | None = None, mean=None, std=None, resize: str | None = None,
               crop: float | None = None, base: InputSpec = DIGITS_INPUT) -> InputSpec:
    """`base` with the given fields replaced, checked: one line naming the bad value and the fix."""
    changes: dict = {}
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
            raise EdgeguardError(f"input size {h}×{w} is outside {MIN_SIZE}..{MAX_SIZE} px; give e.g. --input-size 224")
        changes["shape"] = (base.shape[0], int(h), int(w))
    for name, v in (("mean", mean), ("std", std)):
        if v is not None:
            v = tuple(float(x) for x in v)
            if len(v) != base.shape[0]:
                raise EdgeguardError(f"--{name} needs {base.shape[0]} values (one per channel), got {len(v)}")
            if name == "std" and min(v) <= 0:
                raise EdgeguardError(f"--std values must be > 0, got {list(v)}")
            changes[name] = v
    if resize is not None:
        if resize not in RESIZE_POLICIES:
            raise EdgeguardError(f"unknown resize policy {resize!r}; choose one of {', '.join(RESIZE_POLICIES)}")
        changes["resize"] = resize
    if crop is not None:
        if not 0.1 <= crop <= 1.0:
            raise EdgeguardError(f"--crop must be in [0.1, 1] (the centre crop's share of the shorter side), got {crop}")
        changes["crop"] = float(crop)
    return replace(base, **changes)


def natural_input(size: int) -> InputSpec:
    """A camera model's usual input: RGB at `size`, ImageNet statistics, shorter side then centre crop."""
    return make_input(size, IMAGENET_MEAN, IMAGENET_STD, "center-crop", 1.0)
