"""Attack suites, the attacker's best recipe (envelopes, robust SLC-AUC), and the BN, regrowth and search
attackers, on real MNIST/USPS (small grids)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from edgeguard.artifact import load_artifact, save_artifact
from edgeguard.errors import EdgeguardError
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import curve_auc
from edgeguard.evaluation.suites import SUITES, get_suite, search_recipes
from edgeguard.finetune import AttackRecipe, attack_start
from edgeguard.masks import MaskSet

GRID = (0.02, 0.1, 0.3)
SMALL = dict(target="usps", grid=GRID, seeds=1, max_train=1500, max_test=500, device="cpu")

SUITE_TOML = """
name = "mini"
[[recipe]]
attack = "direct-all/masked"
lr = 1e-3
epochs = 4
batch_size = 64
name = "adam"

[[recipe]]
attack = "direct-all/free"
optimizer = "sgd"
lr = 0.01
epochs = 4
batch_size = 64
schedule = "warmup-cosine"
name = "sgd"

[[recipe]]
attack = "initfc-all/free"
optimizer = "adamw"
lr = 1e-3
weight_decay = 0.01
epochs = 2
batch_size = 64
name = "adamw-short"
"""


def test_envelope_bounds_every_recipe_and_unprotected_transfer_beats_scratch(mnist_model, tmp_path):
    """The unprotected MNIST model against USPS: robust SLC-AUC > 0, and each envelope is ≥ every recipe's
    curve at every ratio (so its area ≥ every recipe's area), for the protected and the scratch curves."""
    f = tmp_path / "mini.toml"
    f.write_text(SUITE_TOML)
    suite = get_suite(str(f))
    assert [r.name for r in suite.recipes] == ["adam", "sgd", "adamw-short"]
    res = evaluate_model(mnist_model, EvalConfig(**SMALL, attacks=list(suite.recipes), suite=suite.name),
                         tmp_path / "rep")
    s = res.suite
    assert s.name == "mini" and s.recipes == ["adam", "sgd", "adamw-short"]
    for kind in ("protected", "scratch"):
        env = np.asarray(s.envelopes[kind])
        for e in res.attacks:
            assert np.all(env >= np.asarray(e.curve(kind)) - 1e-12)
            assert curve_auc(GRID, env[0]) >= curve_auc(GRID, e.curve(kind)[0]) - 1e-12
        assert set(s.winners[kind]) <= set(s.recipes)
    assert s.robust_slc_auc[0] > 0
    assert s.per_recipe_slc_auc["sgd"] == res.attacks[1].slc_auc
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "robust SLC-AUC" in md and (tmp_path / "rep" / "suite.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["suite"]["robust_slc_auc"] == list(s.robust_slc_auc)


@pytest.fixture(scope="module")
def scrambled_bn(mnist_model, tmp_path_factory):
    """The MNIST model whose only 'protection' is scrambled BatchNorm running statistics."""
    art = load_artifact(mnist_model)
    g = torch.Generator().manual_seed(0)
    for m in art.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 5)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 50 + 0.01)
    path = tmp_path_factory.mktemp("bn") / "scrambled.safetensors"
    save_artifact(path, art.model, dataclasses.replace(art.card, method="bn-scrambled"), None)
    return path


def test_bn_attacker_undoes_scrambled_statistics(mnist_model, scrambled_bn, tmp_path):
    """Few steps (BatchNorm's momentum has no time to repair the statistics): the plain recipe stays far below the
    unscrambled model's fine-tuned accuracy, the BN attacker comes within a few points of it."""
    short = AttackRecipe(lr=1e-4, epochs=2, batch_size=128)
    cfg = dict(target="usps", grid=(0.01, 0.02), seeds=1, max_train=2000, max_test=600, device="cpu")
    clean = evaluate_model(mnist_model, EvalConfig(**cfg, attacks=[short]), tmp_path / "clean")
    both = evaluate_model(scrambled_bn, EvalConfig(**cfg, attacks=[short, dataclasses.replace(short, bn="reestimate")]),
                          tmp_path / "scr")
    ref = clean.attacks[0].protected[0][1]
    plain, bn = both.attacks[0].protected[0][1], both.attacks[1].protected[0][1]
    assert both.target_accuracy_direct < 0.3
    assert plain < ref - 0.2
    assert bn > ref - 0.05


def test_regrowth_attacker_gives_pruned_weights_values(mnist_model):
    art = load_artifact(mnist_model)
    mask = MaskSet({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.5
                    for n, p in art.model.named_parameters() if p.dim() > 1})
    mask.bake_(art.model)
    start, keep = attack_start(art.model, mask, AttackRecipe(pruned="regrow"), 0, torch.device("cpu"))
    assert keep is None
    bad = mask.violations(dict(start.named_parameters()))
    total_pruned = sum(int((~m).sum()) for m in mask.masks.values())
    assert sum(bad.values()) == total_pruned  # every pruned weight now has a (small, non-zero) value
    for n, p in start.named_parameters():
        if n in mask.masks:
            kept = dict(art.model.named_parameters())[n][mask.masks[n]]
            assert torch.equal(p[mask.masks[n]], kept)  # the kept weights are untouched
            assert p[~mask.masks[n]].abs().max() < kept.abs().max()
    again, _ = attack_start(art.model, mask, AttackRecipe(pruned="regrow"), 0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), again.parameters()))


def test_search_never_reads_the_test_set(mnist_model, tmp_path, monkeypatch):
    """Poisoned test labels change the reported accuracies but not one recipe the search chooses."""
    import edgeguard.evaluation.execute as execute

    cfg = dict(target="usps", grid=(0.02, 0.05), seeds=1, max_train=600, max_test=300, device="cpu", attacks=[],
               search_trials=3, suite="search", executor="local")
    monkeypatch.setenv("EDGEGUARD_CACHE", str(tmp_path / "c1"))
    clean = evaluate_model(mnist_model, EvalConfig(**cfg), tmp_path / "clean")
    real = execute.get_domain

    def poisoned(name, root=None, **kw):  # kw: the model's classes, matched by name
        d = real(name, root, **kw)
        if name == "usps":
            rng = np.random.default_rng(0)
            d = dataclasses.replace(d, test_y=rng.permutation(d.test_y))
        return d

    monkeypatch.setattr(execute, "get_domain", poisoned)
    monkeypatch.setenv("EDGEGUARD_CACHE", str(tmp_path / "c2"))
    dirty = evaluate_model(mnist_model, EvalConfig(**cfg), tmp_path / "dirty")
    c, d = clean.attacks[-1], dirty.attacks[-1]
    assert c.attack == d.attack == "search"
    assert c.chosen == d.chosen
    assert c.protected != d.protected  # the poison did reach the test set
    trial_rows = [json.loads(x) for x in (tmp_path / "clean" / "runs.jsonl").read_text().splitlines()]
    assert sum(r.get("split") == "trial" for r in trial_rows) == 3 * 2 * 2  # trials × (protected, scratch) × ratios
    dirty_rows = {r["key"]: r for r in map(json.loads, (tmp_path / "dirty" / "runs.jsonl").read_text().splitlines())}
    for r in trial_rows:  # every trial (SHOT phases on the target's unlabelled images among them) scored the same
        if r.get("split") == "trial":
            assert dirty_rows[r["key"]]["accuracy"] == r["accuracy"]
    assert any(r["recipe"].get("pre") == "shot" for r in trial_rows)


def test_suites_are_data_and_bad_files_are_one_line_errors(tmp_path):
    assert {"paper", "standard", "robust", "search"} <= set(SUITES)
    robust = {r.name for r in SUITES["robust"].recipes}
    assert {r.name for r in SUITES["standard"].recipes} < robust
    assert {"bn-reestimate", "regrow", "source-aided"} <= robust
    assert len({json.dumps(r.key(), sort_keys=True) for r in SUITES["robust"].recipes}) == len(robust)
    assert SUITES["paper"].recipes[0].key() == AttackRecipe().key()  # the papers' recipe, keys unchanged
    cands = search_recipes(20, seed=0)
    assert cands == search_recipes(20, seed=0) and len({c.key().__repr__() for c in cands}) == 20
    assert all(1e-5 <= c.lr <= 1e-1 for c in cands)
    bad = tmp_path / "bad.toml"
    for text, match in (('[[recipe]]\nattack = "direct-all"\nlearning_rate = 1', "unknown attack setting"),
                        ('[[recipe]]\nattack = "sideways"', "unknown attack"),
                        ('[[recipe]]\nlr = "fast"', "must be a float"),
                        ("[[recipe", "not a valid toml"),
                        ('[[recipe]]\nname = "a"\n[[recipe]]\nname = "a"\nlr = 1e-3', "two recipes are named")):
        bad.write_text(text)
        with pytest.raises(EdgeguardError, match=match):
            get_suite(str(bad))
    with pytest.raises(EdgeguardError, match="unknown suite"):
        get_suite("strongest")


def test_attacks_cli_lists_suites(tmp_path):
    from click.testing import CliRunner

    from edgeguard.cli import main

    out = CliRunner().invoke(main, ["attacks"])
    assert out.exit_code == 0 and "robust" in out.output and "search" in out.output
    out = CliRunner().invoke(main, ["attacks", "robust", "--json"])
    data = json.loads(out.output)
    assert data[0]["name"] == "robust" and any(r["name"] == "regrow" for r in data[0]["recipes"])
