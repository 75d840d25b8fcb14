"""Fine-tuning attacks and SLC-AUC on real data (small grids)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from edgeguard.artifact import load_artifact, save_artifact
from edgeguard.evaluation.plan import stratified_subset
from edgeguard.evaluation.runner import EvalConfig, evaluate_model
from edgeguard.evaluation.slc_auc import curve_auc, slc_auc
from edgeguard.finetune import AttackRecipe, parse_attack
from edgeguard.masks import MaskSet

FAST = dict(lr=1e-3, epochs=8, batch_size=64)
GRID = (0.02, 0.1, 0.3)


def _cfg(**kw):
    base = dict(target="usps", attacks=[AttackRecipe(**FAST)], grid=GRID, seeds=1, max_train=2000, max_test=600,
                device="cpu")
    base.update(kw)
    return EvalConfig(**base)


def test_slc_auc_trapezoid_on_log_axis():
    r = [0.01, 0.1, 1.0]
    assert curve_auc(r, [1.0, 1.0, 1.0]) == pytest.approx(np.log(100))
    assert curve_auc(r, [0.0, 0.5, 1.0]) == pytest.approx(np.log(10) * 0.25 + np.log(10) * 0.75)
    d = slc_auc(r, [0.1, 0.1, 0.1], [0.5, 0.5, 0.5])
    assert d["slc_auc"] == pytest.approx(-0.4 * np.log(100))
    assert d["slc_auc_normalised"] == pytest.approx(-0.4)


def test_stratified_subset_has_every_class():
    y = np.repeat(np.arange(10), [500, 40, 40, 40, 40, 40, 40, 40, 40, 10])
    idx = stratified_subset(y, 0.001, seed=0, num_classes=10)
    assert set(y[idx]) == set(range(10))
    a, b = stratified_subset(y, 0.1, 1, 10), stratified_subset(y, 0.1, 1, 10)
    assert np.array_equal(a, b) and not np.array_equal(a, stratified_subset(y, 0.1, 2, 10))
    assert abs(len(a) - 83) <= 10


def test_parse_attack_names():
    r = parse_attack("initfc-head/free")
    assert (r.train, r.head, r.pruned) == ("head", "reinit", "free")
    from edgeguard.errors import EdgeguardError

    with pytest.raises(EdgeguardError, match="unknown attack"):
        parse_attack("everything")


def test_transfer_beats_scratch(mnist_model, tmp_path):
    res = evaluate_model(mnist_model, _cfg(), tmp_path / "rep")
    assert res.attacks[0].slc_auc[0] > 0
    name = res.attacks[0].attack
    assert name == "direct-all/masked adam lr=0.001 8ep bs=64"  # settings off NTP's recipe are in the name
    png = "attack_direct-all_masked_adam_lr_0.001_8ep_bs_64.png"
    assert (tmp_path / "rep" / png).stat().st_size > 10_000 and f"({png})" in (tmp_path / "rep" / "report.md").read_text()


@pytest.fixture(scope="module")
def zeroed_model(mnist_model, tmp_path_factory):
    """The MNIST model with every prunable weight masked to 0."""
    art = load_artifact(mnist_model)
    mask = MaskSet.ones(art.model)
    for v in mask.masks.values():
        v.zero_()
    path = tmp_path_factory.mktemp("zero") / "zero.safetensors"
    save_artifact(path, art.model, dataclasses.replace(art.card, method="all-masked"), mask)
    return path


def test_fully_masked_model_is_far_below_scratch_and_stays_zero(zeroed_model, tmp_path):
    res = evaluate_model(zeroed_model, _cfg(), tmp_path / "rep")
    e = res.attacks[0]
    assert e.slc_auc[0] < -0.5
    assert all(n == 0 for n in e.regrown_weights)


def test_free_attack_regrows_pruned_weights(zeroed_model, tmp_path):
    res = evaluate_model(zeroed_model, _cfg(attacks=[AttackRecipe(pruned="free", **FAST)], grid=(0.05, 0.1)),
                         tmp_path / "rep")
    assert all(n > 0 for n in res.attacks[0].regrown_weights)


def test_resumed_evaluation_equals_uninterrupted(mnist_model, tmp_path, monkeypatch):
    """Killed mid-stack (one run of a stack logged, its partner not), the evaluation resumes and ends with the
    same report (to one test image: float summation order); the same grid through worker processes gives the
    same runs."""
    import edgeguard.evaluation.execute as execute

    cfg = _cfg(grid=(0.02, 0.05, 0.1), seeds=1)
    monkeypatch.setenv("EDGEGUARD_CACHE", str(tmp_path / "cache_a"))
    full = evaluate_model(mnist_model, cfg, tmp_path / "a")
    assert full.engine["stacks"] == 3  # protected + scratch of one ratio per stack

    monkeypatch.setenv("EDGEGUARD_CACHE", str(tmp_path / "cache_b"))
    real = execute._row
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the second run of the second stack
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(execute, "_row", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(mnist_model, cfg, tmp_path / "b")
    assert len((tmp_path / "b" / "runs.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(execute, "_row", real)
    resumed = evaluate_model(mnist_model, cfg, tmp_path / "b")
    # the run resumed alone is stacked without its partner, so BatchNorm reduces in another float order: on
    # some CPUs (an Intel Xeon here) 1e-5 in the weights after training, one test image of 600 flips
    for kind in ("protected", "scratch"):
        assert np.allclose(getattr(resumed.attacks[0], kind), getattr(full.attacks[0], kind), atol=2 / 600), kind
    rows = [json.loads(x) for x in (tmp_path / "b" / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 3 protected + 3 scratch, none run twice

    # the same grid in two worker processes: same runs, same numbers up to float summation order (a worker has
    # one thread, not two)
    monkeypatch.setenv("EDGEGUARD_CACHE", str(tmp_path / "cache_c"))
    par = evaluate_model(mnist_model, _cfg(grid=(0.02, 0.05, 0.1), seeds=1, executor="processes", workers=2),
                         tmp_path / "c")
    for kind in ("protected", "scratch"):
        assert np.allclose(par.attacks[0].curve(kind), full.attacks[0].curve(kind), atol=0.02)
    assert len((tmp_path / "c" / "runs.jsonl").read_text().splitlines()) == 6


def test_head_only_attack_keeps_encoder(mnist_model, data_root):
    from edgeguard.domains import get_domain
    from edgeguard.finetune import fine_tune
    from edgeguard.training import TensorData

    art = load_artifact(mnist_model)
    d = get_domain("usps").subset(200)
    tuned = fine_tune(art.model, None, TensorData.from_numpy(d.train_x, d.train_y),
                      AttackRecipe(train="head", head="reinit", epochs=1), seed=0, device="cpu")
    for (k, a), b in zip(art.model.encoder.state_dict().items(), tuned.encoder.state_dict().values()):
        assert torch.equal(a, b.cpu()), k


def _descendants(pid: int) -> set[int]:
    """Live descendants of `pid`, read from /proc (Linux)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_killed_evaluate_leaves_no_worker_behind(mnist_model, tmp_path):
    """`evaluate --workers 2`, parent killed with SIGKILL: its workers and the resource tracker go too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "edgeguard.cli", "evaluate", str(mnist_model), "--target", "usps",
                          "--grid", "0.2,0.5,1.0", "--executor", "processes", "--workers", "2", "--report", str(tmp_path / "r"),
                          "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "EDGEGUARD_CACHE": str(tmp_path / "cache")})
    deadline = time.time() + 120
    kids: set[int] = set()
    while time.time() < deadline and len(kids) < 3:  # 2 workers + the resource tracker
        time.sleep(0.5)
        kids = _descendants(p.pid)
    assert len(kids) >= 2, "the workers never started"
    time.sleep(3)  # let the workers finish their start-up
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 20
    alive = kids
    while time.time() < deadline and alive:
        time.sleep(0.5)
        alive = {k for k in kids if os.path.exists(f"/proc/{k}") and
                 open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}
    assert not alive, f"left behind: {alive}"


def test_executor_auto_picks_processes_only_with_free_cores(monkeypatch):
    """Issue 28: the fastest CPU default (processes on more than one free core), said in one line."""
    import edgeguard.evaluation.execute as execute

    cfg = EvalConfig(target="usps", executor="auto", device="cpu")
    monkeypatch.setattr(execute, "free_cores", lambda: 2)
    got, line = execute.resolve_executor(cfg, "cpu")
    assert (got.executor, got.workers) == ("processes", 2) and "processes ×2" in line
    monkeypatch.setattr(execute, "free_cores", lambda: 1)
    got, line = execute.resolve_executor(cfg, "cpu")
    assert got.executor == "local" and "local" in line
    explicit = EvalConfig(target="usps", executor="local", device="cpu")
    assert execute.resolve_executor(explicit, "cpu")[0] is explicit


def test_evaluate_cli_says_which_executor_it_chose(mnist_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import edgeguard.evaluation.execute as execute
    from edgeguard.cli import main

    monkeypatch.setattr(execute, "free_cores", lambda: 1)
    r = CliRunner().invoke(main, ["evaluate", str(mnist_model), "--target", "usps", "--grid", "0.02,0.05", "--epochs", "1",
                                  "--max-train", "300", "--max-test", "200", "--report", str(tmp_path / "r"),
                                  "--device", "cpu", "--optimizer", "rmsprop"])
    assert r.exit_code == 0, r.output
    assert "executor auto → local" in r.output
    runs = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert any("rmsprop" in json.dumps(run) for run in runs)  # every family the engine has is offered by the CLI
    assert json.loads((tmp_path / "r" / "report.json").read_text())["engine"]["chosen"].startswith("executor auto")
