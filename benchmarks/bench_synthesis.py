"""Pseudo-source candidates (issue 20): synthesise with each recipe, then measure the set itself.

For every model file and every candidate (`--candidate NAME=K=V,K=V`, or the presets below): synthesis wall
time, fidelity (real-source accuracy of a fresh student distilled on the set alone, over the teacher's),
BN-statistics distance, teacher confidence, class histogram. Rows go to RESULTS.md; `--report DIR` also
writes each candidate's grid and histogram (the `edgeguard synthesize --report` files).
    python benchmarks/bench_synthesis.py runs/mnist_cnn32.safetensors --candidate default --candidate di-v2
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from _record import record

from edgeguard.artifact import load_artifact
from edgeguard.config import apply_overrides
from edgeguard.domains import get_domain
from edgeguard.evaluation.fidelity import FidelityConfig, fidelity_report, write_synthesis_report
from edgeguard.methods.synthesis import SynthesisConfig, cache_path, cached_pseudo_source
from edgeguard.training import TensorData

PRESETS = {
    "default": "",
    "pixels-v1": "jitter=0,first_bn_weight=1,tv_weight=0.001,lowres=0,batch_size=256,competition=0,colour=0",  # before issue 20
    "di-400": "iterations=400",
    "di-v2": "batch_size=256,competition=0,colour=0",  # plain DeepInversion, the default from issue 20 to issue 32
    "adi": "colour=0",  # Adaptive DeepInversion without colour jitter
    "colour-always": "colour_agreement=0",  # colour jitter whatever the model: wins on MNIST-M, loses on MNIST
}


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if name in PRESETS and not rest:
        rest = PRESETS[name]
    return name, [kv for kv in rest.split(",") if kv]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--candidate", action="append", default=[],
                    help="NAME=K=V,K=V (synthesis settings) or a preset name: " + ", ".join(PRESETS))
    ap.add_argument("--n", type=int, default=None, help="images per set (default: the config's)")
    ap.add_argument("--fidelity-steps", type=int, default=FidelityConfig().steps)
    ap.add_argument("--source-test", type=int, default=5000, help="real source test images scored")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    lines = ["| model | candidate | seed | images | synthesis s | student acc | teacher acc | fidelity | BN dist "
             "| confidence | class histogram |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in args.models:
        art = load_artifact(path, args.device)
        dom = get_domain(art.card.source_domain, args.data_root)
        test = TensorData.from_numpy(dom.test_x[: args.source_test], dom.test_y[: args.source_test])
        for text in args.candidate or ["default"]:
            name, overrides = parse_candidate(text)
            for seed in range(args.seeds):
                cfg = apply_overrides(SynthesisConfig(init="noise", seed=seed), overrides)
                if args.n:
                    cfg = dataclasses.replace(cfg, n=args.n)
                cached = cache_path(art.model, cfg).exists()  # MAP runs then reuse the same set
                t0 = time.time()
                x, y = cached_pseudo_source(art.model, art.card.num_classes, cfg, args.device)
                secs = float("nan") if cached else time.time() - t0
                rep = fidelity_report(art.model, x, test, FidelityConfig(steps=args.fidelity_steps, seed=seed),
                                      args.device)
                if args.report:
                    write_synthesis_report(args.report / f"{path.stem}_{name}_s{seed}", x, y, list(art.card.classes),
                                           rep, dataclasses.asdict(cfg))
                row = (f"| {path.stem} | {name} `{' '.join(overrides) or 'defaults'}` | {seed} | {len(x)} | "
                       f"{'cached' if cached else f'{secs:.0f}'} | {rep.student_source_accuracy * 100:.2f} | "
                       f"{rep.teacher_source_accuracy * 100:.2f} | **{rep.fidelity * 100:.1f} %** | "
                       f"{rep.bn_distance:.3f} | {rep.teacher_confidence:.3f} | {' '.join(map(str, rep.class_histogram))} |")
                print(row, flush=True)
                lines.append(row)
    lines.append("")
    lines.append(f"Fidelity student: {args.fidelity_steps} Adam steps (batch 128, lr 1e-3 cosine, T = 4, shift 2) "
                 f"on the set alone; scored on the first {args.source_test} real source test images, eval mode.")
    record("Pseudo-source fidelity (issue 20)", lines)


if __name__ == "__main__":
    np.set_printoptions(linewidth=200)
    main()
