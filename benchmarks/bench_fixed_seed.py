"""A refactor's before/after check: a fixed-seed robust-suite evaluation of a cnn32 model and a fixed-seed
hardening, every number printed as JSON (run it on two commits and diff the outputs).

    python benchmarks/bench_fixed_seed.py --out /tmp/before.json    # on the old commit
    python benchmarks/bench_fixed_seed.py --out /tmp/after.json     # on the new one
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edgeguard.artifact import load_artifact
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.suites import get_suite
from edgeguard.protect import protect
from edgeguard.source import train_source

HARDEN = ["outer_steps=12", "eval_every=6", "attacks=2", "inner_steps=8", "suppress_every=4", "proxy_steps=16"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="folder for the model files (default: a temporary one)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(a.work or tempfile.mkdtemp(prefix="edgeguard-fixed-"))
    src = work / "cnn32_mnist.safetensors"
    if not src.exists():
        train_source("cnn32", "mnist", src, epochs=1, max_train=4000, device="cpu", seed=0)
    prot = work / "magnitude.safetensors"
    protect("magnitude", src, prot, target="usps", device="cpu")
    hard = work / "harden.safetensors"
    h = protect("harden", prot, hard, target="usps", overrides=HARDEN, device="cpu")
    out: dict = {"harden": {"source": h.source.after, "history": load_artifact(hard).card.protection.get("history")}}
    cfg = EvalConfig(target="usps", attacks=list(get_suite("robust").recipes), grid=(0.01, 0.05), seeds=1,
                     max_train=2000, max_test=1000, device="cpu", executor="local", suite="robust")
    res = evaluate_model(prot, cfg, work / "robust_report").to_dict()
    out["robust"] = {"robust_slc_auc": res["suite"]["robust_slc_auc"],
                     "curves": {e["attack"]: [e["protected"], e["scratch"]] for e in res["attacks"]}}
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out["robust"]["robust_slc_auc"]), out["harden"]["source"])


if __name__ == "__main__":
    main()
