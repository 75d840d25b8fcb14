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


@pytest.fixture(scope="session")
def protected(mnist_model, tmp_path_factory):
    """The MNIST model with a 30 % magnitude mask per layer, first conv dense (a cheap stand-in protected model:
    the registered `magnitude` baseline, measured against USPS)."""
    from edgeguard.protect import protect

    path = tmp_path_factory.mktemp("prot") / "prot.safetensors"
    protect("magnitude", mnist_model, path, target="usps", overrides=["sparsity=0.3", "budget=layer"], device="cpu")
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from converters.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "vendor"), generate_keypair(d / "other")
