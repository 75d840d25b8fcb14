"""`edgeguard demo`: the whole chain on the embedded digit sample, small enough for a CPU in minutes."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .source import train_source


def run_demo(out: Path, *, epochs: int = 4, device: str = "auto", echo: Callable[[str], None] = print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    echo("[1] train a source model: small_cnn on the embedded MNIST sample")
    src = train_source("small_cnn", "mnist_sample", out / "source.safetensors", epochs=epochs, device=device)
    echo(f"    source accuracy {src['test_accuracy'] * 100:.1f}% → {src['out']}")
    summary = {"source": src}
    echo(f"done in {time.perf_counter() - t0:.0f} s; files in {out}/")
    return summary
