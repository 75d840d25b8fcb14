"""The hardening test's body (tests/test_harden.py) over several hardening seeds: how far the never-sampled
head-only attack drops on the hardened model, per seed, with the test's small budget.

    python benchmarks/bench_harden_seeds.py --seeds 0 1 2 --set eval_every=10
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _record import record

from edgeguard.artifact import load_artifact
from edgeguard.domains import get_domain
from edgeguard.evaluation.plan import stratified_subset
from edgeguard.finetune import AttackRecipe, fine_tune
from edgeguard.protect import protect
from edgeguard.source import train_source
from edgeguard.training import TensorData, evaluate

TEST_BUDGET = ["outer_steps=60", "eval_every=20", "attacks=2", "proxy_steps=32"]
UNSAMPLED = AttackRecipe(train="head", head="kept", optimizer="adam", lr=1e-3, epochs=30)


def attacked(path: Path, train: TensorData, test: TensorData) -> float:
    art = load_artifact(path)
    return evaluate(fine_tune(art.model, art.mask, train, UNSAMPLED, seed=0, device="cpu"), test)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="on top of the test's budget")
    ap.add_argument("--work", default=None, help="folder for the source and magnitude models (reused)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(a.work or tempfile.mkdtemp(prefix="edgeguard-harden-seeds-"))
    src, prot = work / "mnist.safetensors", work / "magnitude.safetensors"
    if not src.exists():
        train_source("small_cnn", "mnist", src, device="cpu")
    if not prot.exists():
        protect("magnitude", src, prot, target="usps", overrides=["sparsity=0.3", "budget=layer"], device="cpu")
    usps = get_domain("usps")
    idx = stratified_subset(usps.train_y, 0.01, 0, 10)
    train = TensorData.from_numpy(usps.train_x[idx], usps.train_y[idx])
    test = TensorData.from_numpy(usps.test_x, usps.test_y)
    before = attacked(prot, train, test)
    rows = ["| seed | attacked input | attacked hardened | drop (points) | source after | s |", "|---|---|---|---|---|---|"]
    afters = []
    for seed in a.seeds:
        t = time.perf_counter()
        out = work / f"hardened_{seed}.safetensors"
        s = protect("harden", prot, out, target="usps", overrides=[*TEST_BUDGET, *a.overrides, f"seed={seed}"],
                    device="cpu")
        after = attacked(out, train, test)
        afters.append(after)
        rows.append(f"| {seed} | {before * 100:.2f} % | {after * 100:.2f} % | {(before - after) * 100:.1f} | "
                    f"{s.source.after * 100:.2f} % | {time.perf_counter() - t:.0f} |")
        print(rows[-1], flush=True)
    if len(afters) > 1:
        rows.append(f"| mean ± std | | {statistics.mean(afters) * 100:.1f} ± {statistics.stdev(afters) * 100:.1f} % | | | |")
    record(f"Hardening test budget over seeds ({' '.join(a.overrides) or 'as in the test before issue 28'})", rows)


if __name__ == "__main__":
    main()
