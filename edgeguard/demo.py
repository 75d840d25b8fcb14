"""`edgeguard demo`: the whole chain on the embedded digit sample, small enough for a CPU in minutes.

train (MNIST sample) → protect (MAP or NTP against the USPS sample) → evaluate (a short fine-tuning-attack
grid) → build a signed bundle → validate it with the device runtime.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .source import train_source

SOURCE, TARGET = "mnist_sample", "usps_sample"
# Each method's settings for the embedded sample (2,000 images per domain): small enough for a CPU in minutes.
DEMO_SETTINGS = {"map": ["epochs=10"], "ntp": ["source_fraction=0.5", "target_fraction=0.5", "iterations=10"],
                 "harden": ["source_fraction=0.5", "target_fraction=0.5", "outer_steps=40", "eval_every=10",
                            "attacks=2"]}


def run_demo(out: Path, *, epochs: int = 10, method: str = "map", then: list[str] | None = None,
             device: str = "auto", echo: Callable[[str], None] = print) -> dict:
    from .evaluation.runner import EvalConfig, evaluate_model
    from .finetune import AttackRecipe
    from .protect import protect_chain

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {}
    echo(f"[1/5] train a source model: small_cnn on {SOURCE} (embedded real MNIST digits)")
    src = train_source("small_cnn", SOURCE, out / "source.safetensors", epochs=epochs, device=device, lr=3e-3,
                       batch_size=64)
    echo(f"      source test accuracy {src['test_accuracy'] * 100:.1f}% ({src['seconds']:.0f} s)")
    summary["source"] = src

    chain = [method, *(then or [])]
    prot = out / f"protected_{'_'.join(chain)}.safetensors"
    echo(f"[2/5] protect it against {TARGET} with {' then '.join(m.upper() for m in chain)}")
    settings = [f"{m}.{kv}" for m in chain for kv in DEMO_SETTINGS.get(m, [])]
    *stages, r = protect_chain(chain, out / "source.safetensors", prot, target=TARGET, overrides=settings,
                               device=device)
    for stage in stages:
        echo(f"      {stage.line()}")
    s, t = r.source, r.accuracy(TARGET)
    echo(f"      source {s.before * 100:.1f}% → {s.after * 100:.1f}%, target {t.before * 100:.1f}% → "
         f"{t.after * 100:.1f}%, sparsity {r.sparsity * 100:.1f}% ({r.seconds:.0f} s)")
    summary["protect"] = r.to_dict()

    echo("[3/5] attack: fine-tune protected, unprotected and from-scratch models on target subsets")
    cfg = EvalConfig(target=TARGET, attacks=[AttackRecipe(lr=1e-3, epochs=10, batch_size=64)],
                     grid=(0.01, 0.05, 0.2, 1.0), device=device)
    res = evaluate_model(prot, cfg, out / "report", unprotected=out / "source.safetensors")
    e = res.attacks[0]
    echo(f"      SLC-AUC {e.slc_auc[0]:+.2f} (unprotected {e.unprotected_slc_auc[0]:+.2f}; below 0 = worse "
         f"than training from scratch)")
    summary["evaluate"] = {"slc_auc": e.slc_auc[0], "unprotected_slc_auc": e.unprotected_slc_auc[0]}

    echo("[4/5] build a signed deployment bundle (ONNX, mask baked in)")
    from converters.signing import generate_keypair

    from .build import build

    key, pub = generate_keypair(out / "vendor")
    b = build(prot, out / "bundle", target="cpu", sign_key=key, samples=200, report=out / "report")
    echo(f"      {b['bundle']}: ONNX/PyTorch max |Δlogit| {b['parity']['max_abs_diff']:.1e}")

    echo("[5/5] on the device (no PyTorch): edgeguard-runtime validate")
    from runtime.cli import main as runtime_main

    code = runtime_main(["validate", str(out / "bundle"), "--public-key", str(pub),
                         "--report", str(out / "validate.json")])
    summary["validate_exit_code"] = code
    echo(f"done in {time.perf_counter() - t0:.0f} s. Report: {out / 'report' / 'report.md'}")
    return summary
