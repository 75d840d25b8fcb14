"""Small samples of real MNIST, USPS and MNIST-M that ship inside the package (no data root needed).

Made by tools/make_sample.py from the shared data: the first images of each split's fixed shuffle.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import EdgeguardError
from ..inputspec import InputSpec
from .base import DIGITS, Domain, to_input
from .registry import register_domain

SAMPLE_FILE = "digits_sample.npz"


def _load(prefix: str, name: str, spec: InputSpec) -> Domain:
    try:
        ref = resources.files("edgeguard") / "data" / SAMPLE_FILE
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            arrays = {k: z[f"{prefix}_{k}"] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, KeyError) as e:
        raise EdgeguardError(f"embedded sample {SAMPLE_FILE} is missing or damaged ({e}); reinstall edgeguard") \
            from None
    return Domain(name, to_input(arrays["train_x"], spec), arrays["train_y"].astype(np.int64),
                  to_input(arrays["test_x"], spec), arrays["test_y"].astype(np.int64), DIGITS)


@register_domain("mnist_sample", "", "embedded: 2,000 train / 500 test MNIST digits")
def load_mnist_sample(_: Path, spec: InputSpec, entry: Path) -> Domain:
    return _load("mnist", "mnist_sample", spec)


@register_domain("usps_sample", "", "embedded: 2,000 train / 500 test USPS digits")
def load_usps_sample(_: Path, spec: InputSpec, entry: Path) -> Domain:
    return _load("usps", "usps_sample", spec)


@register_domain("mnist_m_sample", "", "embedded: MNIST-M digits on colour patches")
def load_mnist_m_sample(_: Path, spec: InputSpec, entry: Path) -> Domain:
    return _load("mnist_m", "mnist_m_sample", spec)
