"""The same chain from Python, on the embedded sample (no data root needed)."""
from pathlib import Path

from edgeguard.build import build
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.finetune import AttackRecipe
from edgeguard.methods.map import MapConfig
from edgeguard.protect import protect
from edgeguard.source import train_source

out = Path("runs/python_api")
train_source("small_cnn", "mnist_sample", out / "source.safetensors", epochs=10, lr=3e-3, batch_size=64)
# a config object, KEY=VALUE overrides (as `--set` on the command line), or both
summary = protect("map", out / "source.safetensors", out / "map.safetensors", target="usps_sample",
                  config=MapConfig(epochs=10), overrides=["repair_epochs=2"])
print(summary.line())
res = evaluate_model(out / "map.safetensors",
                     EvalConfig(target="usps_sample", attacks=[AttackRecipe(lr=1e-3, epochs=10)], grid=(0.01, 0.1, 1.0)),
                     out / "report", unprotected=out / "source.safetensors")
print("SLC-AUC", res.attacks[0].slc_auc)
print(build(out / "map.safetensors", out / "bundle", target="cpu"))
