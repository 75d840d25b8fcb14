"""Hardening (methods/harden.py) on real MNIST → USPS, small budgets: an attack it never sampled does worse on
the hardened model than on its input, the source stays, the mask stays exact, bad settings are one-line
errors. A killed hardening resuming to the identical file: tests/test_methods.py's contract test."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgeguard.artifact import load_artifact
from edgeguard.cli import main
from edgeguard.domains import get_domain
from edgeguard.errors import EdgeguardError
from edgeguard.evaluation.plan import stratified_subset
from edgeguard.finetune import AttackRecipe, fine_tune
from edgeguard.protect import protect
from edgeguard.training import TensorData, evaluate

# Small enough for the test suite; the full budget is in benchmarks/bench_harden.py.
FAST = ["outer_steps=20", "eval_every=10", "attacks=1", "proxy_steps=32"]
# Never sampled: every simulated attack trains all weights; this one trains the head alone (a linear probe on
# the hardened features), Adam 1e-3 for 30 epochs on 1 % of USPS.
UNSAMPLED = AttackRecipe(train="head", head="kept", optimizer="adam", lr=1e-3, epochs=30)
MARGIN = 0.05  # its USPS accuracy drops by at least 5 points (measured 69.6 → 46.1 %, RESULTS "The test suite's time")


@pytest.fixture(scope="module")
def hardened(protected, tmp_path_factory):
    out = tmp_path_factory.mktemp("harden") / "hardened.safetensors"
    summary = protect("harden", protected, out, target="usps", overrides=FAST, device="cpu")
    return out, summary


def _attacked(path, data_root) -> float:
    usps = get_domain("usps", str(data_root))
    idx = stratified_subset(usps.train_y, 0.01, 0, 10)
    train = TensorData.from_numpy(usps.train_x[idx], usps.train_y[idx])
    test = TensorData.from_numpy(usps.test_x, usps.test_y)
    art = load_artifact(path)
    return evaluate(fine_tune(art.model, art.mask, train, UNSAMPLED, seed=0, device="cpu"), test)


def test_hardening_beats_an_attack_it_never_sampled_and_keeps_source_and_mask(hardened, protected, data_root):
    out, summary = hardened
    before, after = load_artifact(protected), load_artifact(out)  # load verifies every masked weight is 0
    assert after.mask.sha256() == before.mask.sha256()  # the input's mask, and load checked its zeros
    src = summary.source
    assert src.after >= src.before - 0.01, (src.before, src.after)
    assert after.card.method == "magnitude+harden"
    assert after.card.protection["input"]["method"] == "magnitude"
    acc_before, acc_after = _attacked(protected, data_root), _attacked(out, data_root)
    assert acc_after <= acc_before - MARGIN, (acc_before, acc_after)


def test_sampled_attacks_cover_the_distribution():
    from edgeguard.finetune import ATTACK_SPACE
    from edgeguard.methods.harden import HardenConfig, sample_attack

    rng = np.random.default_rng(0)
    atks = [sample_attack(rng, HardenConfig())[0] for _ in range(400)]
    assert {a.optimizer for a in atks} == set(ATTACK_SPACE.optimizers)  # every family a buyer might use
    assert {a.pruned for a in atks} == {"masked", "free", "regrow"}
    assert {a.head for a in atks} == {"reinit", "kept"} and {a.bn for a in atks} == {"reestimate", "kept"}
    for a in atks:
        lo, hi = ATTACK_SPACE.lr[a.optimizer]
        assert lo <= a.lr <= hi
        assert a.weight_decay == ATTACK_SPACE.weight_decay[a.optimizer]  # the scored attacker's, not its own
    sgd = sorted(a.lr for a in atks if a.optimizer == "sgd")
    assert sgd[0] < 3e-3 and sgd[-1] > 3e-2  # log-uniform: both ends drawn


@pytest.mark.parametrize("setting, message", [
    ("attacks=0", "at least 1"),
    ("p_free=0.8", "must be ≤ 0.5"),
    ("p_head_reinit=1.5", "probability"),
    ("holdout=1", "holdout must be in"),
    ("lr=0", "positive"),
])
def test_bad_settings_are_one_line_errors(protected, tmp_path, setting, message):
    r = CliRunner().invoke(main, ["harden", str(protected), "--target", "usps", "--out",
                                  str(tmp_path / "h.safetensors"), "--set", setting])
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_harden_refuses_what_it_cannot_refine(protected, tmp_path):
    with pytest.raises(EdgeguardError, match="not mnist_m"):
        protect("harden", protected, tmp_path / "h.safetensors", target="mnist_m", overrides=["outer_steps=1"],
                device="cpu")
    with pytest.raises(EdgeguardError, match="only a refining method"):
        protect("magnitude", protected, tmp_path / "m.safetensors", target="usps", device="cpu")
    r = CliRunner().invoke(main, ["protect", "--method", "magnitude", "--source-model", str(protected), "--target",
                                  "usps", "--out", str(tmp_path / "x.safetensors"), "--set", "harden.attacks=2"])
    assert r.exit_code != 0 and "add --then harden" in r.output
    r = CliRunner().invoke(main, ["protect", "--method", "harden", "--source-model", str(protected), "--target",
                                  "usps", "--out", str(tmp_path / "x.safetensors"), "--then", "magnitude"])
    assert r.exit_code != 0 and "--then magnitude: only a refining method" in r.output
