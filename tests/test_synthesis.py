"""The pseudo-source (issue 20): the recipe MAP uses beats the earlier one on the data-free distillation
check, at the same budget; the fidelity report and `edgeguard synthesize --report` on a real model."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeguard.artifact import load_artifact
from edgeguard.domains import get_domain
from edgeguard.errors import EdgeguardError
from edgeguard.evaluation.fidelity import FidelityConfig, distilled_accuracy, fidelity_report
from edgeguard.methods.synthesis import SynthesisConfig, keep_confident, synthesize
from edgeguard.models.registry import input_of
from edgeguard.training import TensorData

BUDGET = dict(n=256, batch_size=128, iterations=80, seed=0, init="noise", student_steps=30)  # why 80: RESULTS
CHECK = FidelityConfig(steps=300)


@pytest.fixture(scope="module")
def teacher_and_test(mnist_model, data_root):
    art = load_artifact(mnist_model)
    mnist = get_domain("mnist")
    return art.model, TensorData.from_numpy(mnist.test_x[:2000], mnist.test_y[:2000])


def test_recipe_distils_a_student_well_above_chance(teacher_and_test):
    """The pseudo-source at a budget the suite affords teaches a student far above chance on real MNIST. The
    comparison with the recipe before issue 20 (26.1 % against 9.9 % at 120 inversion steps) is a benchmark's
    job: RESULTS, "MAP without source data (issue 20)"."""
    teacher, test = teacher_and_test
    x_new, y_new = synthesize(teacher, 10, SynthesisConfig(**BUDGET), "cpu")
    assert x_new.shape == (256, 3, 32, 32) and x_new.dtype == np.uint8
    assert np.bincount(y_new, minlength=10).min() >= 25  # balanced labels
    new = distilled_accuracy(teacher, x_new, test, CHECK, "cpu")
    assert new > 0.18, new  # chance is 10 %; measured 28.8 % (26.1 % with plain DeepInversion, at 120 iterations)


def test_fidelity_report_on_real_source_images_is_near_one(teacher_and_test):
    """Real MNIST training images are the best possible pseudo-source: the check must say so, also for a vendor's
    model that normalises its own way (std 0.25 and its first conv halved: the same function), whose student
    must be built for the teacher's input, not trained on one and scored on another (before that fix: 10 %)."""
    teacher, test = teacher_and_test
    vendor = copy.deepcopy(teacher)
    vendor.input_spec = replace(input_of(teacher), std=(0.25,) * 3)
    conv = next(m for m in vendor.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(0.5)
    real = get_domain("mnist").train_x[:512]
    rep = fidelity_report(vendor, real, test, CHECK, "cpu")
    assert rep.teacher_source_accuracy > 0.9 and rep.fidelity > 0.9 and rep.images == 512, rep
    assert sum(rep.class_histogram) == 512 and min(rep.class_histogram) > 20
    assert rep.bn_distance < 1.0 and 0.5 < rep.teacher_confidence <= 1.0


def test_confidence_filter_keeps_the_surest_per_class(teacher_and_test):
    teacher, _ = teacher_and_test
    x = get_domain("usps").train_x[:300]
    y = np.arange(300) % 10  # labels the images mostly do not have
    kx, ky = keep_confident(teacher, x, y, 100, 10)
    assert len(kx) == 100 and np.bincount(ky, minlength=10).tolist() == [10] * 10


def test_competition_student_for_a_model_outside_the_registry(teacher_and_test):
    """The default recipe's competition student is a fresh copy of the teacher when its architecture is not in
    the registry (an imported vendor model): every layer re-initialised, the teacher and its outputs untouched,
    and a second batch made against the student."""
    from edgeguard.methods.synthesis import _competition_student

    teacher, _ = teacher_and_test
    outside = copy.deepcopy(teacher)
    outside.arch = "vendorpkg.models:their_net"  # as an imported model's card names it
    before = {k: v.clone() for k, v in outside.state_dict().items()}
    student = _competition_student(outside, 10, SynthesisConfig(), "cpu")
    assert type(student) is type(outside) and not any(p.requires_grad for p in student.parameters())
    changed = [k for k, v in student.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert len(changed) >= len(before) // 2, changed  # weights and BN statistics reset, not the teacher's
    x, y = synthesize(outside, 10, SynthesisConfig(n=16, batch_size=8, iterations=3, student_steps=2, init="noise"),
                      "cpu")
    assert x.shape == (16, 3, 32, 32) and len(y) == 16
    assert all(torch.equal(v, before[k]) for k, v in outside.state_dict().items())


def test_bad_synthesis_settings_are_refused():
    for bad in (dict(recipe="gan"), dict(lowres=1.0), dict(oversample=0.5), dict(jitter=-1), dict(colour=-0.1),
                dict(competition=-1), dict(student_steps=0), dict(relabel=1.0)):
        with pytest.raises(EdgeguardError, match="synth"):
            SynthesisConfig(**bad).validate()


def test_cli_synthesize_report(mnist_model, tmp_path):
    from click.testing import CliRunner

    from edgeguard.cli import main

    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["synthesize", str(mnist_model), "--report", str(out), "-n", "64",
                                  "--set", "iterations=20", "--set", "batch_size=64", "--fidelity-steps", "50", "--json",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["images"] == 64 and 0 <= got["fidelity"] <= 1.05
    for name in ("grid.png", "histogram.png", "fidelity.json"):
        assert (out / name).stat().st_size > 100
    r = CliRunner().invoke(main, ["synthesize", str(mnist_model)])
    assert r.exit_code != 0 and "--out" in r.output


def test_cli_synthesize_report_as_the_readme_writes_it(mnist_model, tmp_path):
    """No --device: `auto` is resolved like every other command (issue 32 item 4: it raised from torch)."""
    from click.testing import CliRunner

    from edgeguard.cli import main

    r = CliRunner().invoke(main, ["synthesize", str(mnist_model), "--report", str(tmp_path / "rep"), "-n", "32",
                                  "--set", "iterations=5", "--set", "batch_size=32", "--fidelity-steps", "5"])
    assert r.exit_code == 0 and "fidelity" in r.output, r.output


@pytest.fixture(scope="module")
def colour_teacher(tmp_path_factory, data_root):
    """cnn32 trained on real MNIST-M (digits over colour photo patches)."""
    from edgeguard.source import train_source

    out = tmp_path_factory.mktemp("mnistm") / "mnistm_cnn32.safetensors"
    train_source("cnn32", "mnist_m", out, epochs=6, device="cpu")
    return load_artifact(out).model


def test_relabel_reads_labels_on_the_restyled_images(colour_teacher):
    """A colour teacher answers few classes on raw grey MNIST digits; restyling first and reading the labels
    after (`relabel`) spreads them over more classes (issue 32: the restyled set had 310 of 512 images in one
    class)."""
    teacher = colour_teacher
    start = get_domain("mnist").train_x[:128]
    cfg = SynthesisConfig(n=128, batch_size=128, iterations=40, init="target")
    _, raw = synthesize(teacher, 10, cfg, "cpu", init_images=start)
    _, restyled = synthesize(teacher, 10, replace(cfg, relabel=0.5), "cpu", init_images=start)
    assert np.bincount(restyled, minlength=10).max() < np.bincount(raw, minlength=10).max(), (raw, restyled)
