"""Shared fixtures: the real data root (../shared/data-raw), small trained models, a scratch cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    env = os.environ.get("EDGEGUARD_DATA_ROOT")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data-raw"]:
        if (cand / "mnist").exists():
            return cand
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("real data not found: set EDGEGUARD_DATA_ROOT to ../shared/data-raw")
    return root


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory):
    os.environ.setdefault("EDGEGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = _data_root()
    if root is not None:
        os.environ["EDGEGUARD_DATA_ROOT"] = str(root)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def mnist_model(tmp_path_factory, data_root):
    """small_cnn trained on real MNIST with `edgeguard train`'s defaults: the source model for the method tests."""
    from edgeguard.source import train_source

    out = tmp_path_factory.mktemp("models") / "mnist_small.safetensors"
    train_source("small_cnn", "mnist", out, device="cpu")
    return out
