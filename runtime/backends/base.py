"""The backend interface every runtime backend implements."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) → float32 logits (N, classes)."""
        ...

    def describe(self) -> dict:
        ...
