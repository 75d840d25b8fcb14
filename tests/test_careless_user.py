"""Issue 34: a careless user loses nothing and is never misled. One test per failure found by trying
edgeguard as a new user; each failed on 166342a (before the fixes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgeguard.cli import main
from edgeguard.domains import get_domain
from edgeguard.domains.base import DIGITS, Domain
from edgeguard.errors import CheckFailed, EdgeguardError

REPO = Path(__file__).resolve().parents[1]
RUNTIME = [sys.executable, "-m", "runtime.cli"]
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _write_folder(root: Path, names, per_class: int = 8, source: str = "usps_sample") -> Path:
    """Real digits (the embedded USPS sample) as PNG class folders named `names` (label i → names[i])."""
    d = get_domain(source)
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j, k in enumerate(np.flatnonzero(d.train_y == i)[:per_class]):
            Image.fromarray(d.train_x[k].transpose(1, 2, 0)).save(root / name / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def sample_model(tmp_path_factory):
    """small_cnn trained briefly on the embedded MNIST sample (classes 0…9)."""
    from edgeguard.source import train_source

    out = tmp_path_factory.mktemp("careless") / "src.safetensors"
    train_source("small_cnn", "mnist_sample", out, epochs=2, device="cpu", lr=3e-3, batch_size=64)
    return out


# --- 1. silent wrong results ---------------------------------------------------------------------------------
def test_other_class_names_are_refused_not_mapped_by_position(tmp_path, sample_model):
    folder = _write_folder(tmp_path / "words", NAMES)
    runner = CliRunner()
    args = ["protect", "--method", "magnitude", "--source-model", str(sample_model), "--target",
            f"imagefolder:{folder}", "--out", str(tmp_path / "p.safetensors"), "--device", "cpu"]
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "do not match the model's" in r.output and "--class-map" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "p.safetensors").exists()
    # said on purpose: an explicit pairing is accepted, and the labels follow it
    mapping = ",".join(f"{w}={d}" for w, d in zip(NAMES, DIGITS))
    dom = get_domain(f"imagefolder:{folder}", classes=DIGITS, class_map=mapping)
    raw = get_domain(f"imagefolder:{folder}")
    assert dom.classes == DIGITS
    assert [DIGITS[v] for v in dom.train_y] == [DIGITS[NAMES.index(raw.classes[v])] for v in raw.train_y]
    assert get_domain(f"imagefolder:{folder}", classes=DIGITS, class_map="position").classes == DIGITS


def test_same_names_in_another_order_are_matched_by_name():
    from edgeguard.domains.classes import align_classes

    d = get_domain("usps_sample")
    order = tuple(reversed(DIGITS))  # the same classes listed backwards: label i means digit 9 - i
    shuffled = Domain("rev", d.train_x, 9 - d.train_y, d.test_x, 9 - d.test_y, order)
    back = align_classes(shuffled, DIGITS)
    assert np.array_equal(back.train_y, d.train_y) and np.array_equal(back.test_y, d.test_y)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    folder = _write_folder(tmp_path / "f", DIGITS[:3], per_class=4)
    (folder / "3").mkdir()
    with pytest.raises(EdgeguardError, match=r"f/3: class folder holds no images"):
        get_domain(f"imagefolder:{folder}")


def test_image_overwritten_in_place_is_decoded_again(tmp_path):
    folder = _write_folder(tmp_path / "big", DIGITS, per_class=7)  # 70 files: past the old 64-file shortcut
    name = f"imagefolder:{folder}"
    before = get_domain(name)
    target = folder / "0" / "000.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(target)  # same name, same folder, new pixels
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    after = get_domain(name)
    assert after.train_x.astype(int).sum() + after.test_x.astype(int).sum() > \
        before.train_x.astype(int).sum() + before.test_x.astype(int).sum()


def test_folder_with_train_but_no_test_is_not_read_as_one_class(tmp_path):
    _write_folder(tmp_path / "f" / "train", DIGITS[:3], per_class=2)
    with pytest.raises(EdgeguardError, match="has train/ but no test/"):
        get_domain(f"imagefolder:{tmp_path / 'f'}")


def test_missing_imagefolder_path_gets_the_right_hint(tmp_path):
    with pytest.raises(EdgeguardError) as e:
        get_domain(f"imagefolder:{tmp_path / 'nope'}")
    assert "not found" in str(e.value) and "data-root" not in str(e.value) and "class" in str(e.value)


# --- 2. misleading verdicts ----------------------------------------------------------------------------------
def test_weak_protection_is_not_shipped_as_protection(tmp_path, sample_model, keys):
    from edgeguard.artifact import read_card
    from edgeguard.build import build

    out = tmp_path / "weak.safetensors"
    args = ["protect", "--method", "magnitude", "--set", "sparsity=0.05", "--source-model", str(sample_model),
            "--target", "usps_sample", "--out", str(out), "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "weak protection" in r.output and "--allow-weak" in r.output, r.output
    assert out.exists() and read_card(out).protection["strength"]["level"] == "weak"  # nothing lost
    assert CliRunner().invoke(main, [*args, "--allow-weak"]).exit_code == 0
    with pytest.raises(CheckFailed, match="weak protection"):
        build(out, tmp_path / "b", samples=20)
    assert not (tmp_path / "b").exists()
    build(out, tmp_path / "b", samples=20, sign_key=keys[0][0], allow_weak=True)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["protection"]["strength"] == "weak" and m["protection"]["protected"] is False
    r = subprocess.run([*RUNTIME, "validate", str(tmp_path / "b"), "--public-key", str(keys[0][1])],
                       capture_output=True, text=True)
    first = r.stdout.splitlines()[0].split()
    assert first[:2] == ["weak", "protection"], r.stdout


def test_validate_fails_when_the_input_differs_from_the_measured_one(tmp_path, sample_model, keys):
    from converters.signing import sign
    from edgeguard.build import build

    prot = tmp_path / "map.safetensors"
    r = CliRunner().invoke(main, ["protect", "--method", "magnitude", "--source-model", str(sample_model),
                                  "--out", str(prot), "--device", "cpu"])  # no target: untested, shippable
    assert r.exit_code == 0, r.output
    build(prot, tmp_path / "b", samples=20, sign_key=keys[0][0])
    man = tmp_path / "b" / "manifest.json"
    m = json.loads(man.read_text())
    m["measured_input"]["mean"] = [0.485, 0.456, 0.406]  # a vendor measured with other statistics
    man.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    (tmp_path / "b" / "manifest.sig").write_bytes(sign(man.read_bytes(), keys[0][0]))
    r = subprocess.run([*RUNTIME, "validate", str(tmp_path / "b"), "--public-key", str(keys[0][1])],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "input" in r.stderr and "measured" in r.stderr, r.stdout + r.stderr


def test_build_follows_the_cards_input(tmp_path, sample_model):
    """The input belongs to the model: a card that says 64×64 ships a 64-px graph, 64-px validation sets and a
    manifest whose measured input is the one the device feeds."""
    import dataclasses

    import numpy as np

    from edgeguard.artifact import load_artifact, save_artifact
    from edgeguard.build import build
    from edgeguard.card import InputSpec
    from runtime.manifest import read_manifest

    art = load_artifact(sample_model)
    card = dataclasses.replace(art.card, input=InputSpec(shape=(3, 64, 64), resize="center-crop"))
    odd = tmp_path / "odd.safetensors"
    save_artifact(odd, art.model, card, art.mask)
    build(odd, tmp_path / "b", samples=20, allow_weak=True)
    m, _ = read_manifest(tmp_path / "b", require_signature=False)
    assert m.input.shape == [3, 64, 64] and m.measured_input == m.input and m.input.resize == "center-crop"
    with np.load(tmp_path / "b" / m.authorised.file) as z:
        assert z["x"].shape[1:] == (3, 64, 64)


def test_readme_lists_exactly_the_files_the_bundle_holds(tmp_path, sample_model):
    from converters.bundle import DomainSamples, ModelDescription, build_bundle
    from edgeguard.artifact import load_artifact

    art = load_artifact(sample_model)
    d = get_domain("mnist_sample")
    desc = ModelDescription(classes=list(DIGITS), masks={}, authorised=DomainSamples("m", d.test_x[:20], d.test_y[:20]),
                            std=(0.2, 0.3, 0.4))  # per-channel std: nvinfer cannot express it, no deepstream/
    build_bundle(art.model, desc, tmp_path / "b", runtime_wheel=False)
    readme = (tmp_path / "b" / "README.txt").read_text()
    listed = {line.split()[0].rstrip("/") for line in readme.split("\n\nOn the device:")[0].splitlines()[2:]
              if line and not line.startswith((" ", "("))}
    held = {p.name for p in (tmp_path / "b").iterdir()}
    assert listed == held, (listed, held)
    assert "deepstream" not in held and "no deepstream/" in readme


# --- 3. every registered architecture trains ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["cnn32", "mobilenet_v3_small", "resnet18", "small_cnn", "vgg11"])
def test_every_registered_architecture_trains_well_above_chance(arch):
    from edgeguard.models import create_model, list_models
    from edgeguard.training import TensorData, TrainConfig, evaluate, seed_everything, train_classifier

    assert arch in list_models()
    d = get_domain("mnist_sample")
    seed_everything(0)
    model = create_model(arch, 10)
    train_classifier(model, TensorData.from_numpy(d.train_x[:800], d.train_y[:800]),
                     TrainConfig(epochs=5, lr=1e-3, batch_size=64, device="cpu"))
    acc = evaluate(model, TensorData.from_numpy(d.test_x[:500], d.test_y[:500]))  # eval mode: running BN stats
    assert acc >= 0.4, f"{arch}: {acc:.3f} in eval mode (chance 0.1)"  # measured 0.59-0.96 (RESULTS)


def test_registry_contract_covers_every_architecture():
    import torch

    from edgeguard.models import create_model, list_models
    from edgeguard.models.registry import default_input

    assert set(list_models()) == {"cnn32", "mobilenet_v3_small", "natural_ref", "resnet18", "small_cnn", "vgg11"}
    # natural_ref is mobilenet_v3_small (trained above) at the natural-image reference input (PACS rows: RESULTS)
    spec = default_input("natural_ref")
    assert spec.shape == (3, 112, 112) and spec.resize == "center-crop" and spec.mean != (0.5, 0.5, 0.5)
    ref, mnv3 = create_model("natural_ref", 7), create_model("mobilenet_v3_small", 7)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in mnv3.named_parameters()]
    assert ref.input_spec == spec and ref(torch.zeros(2, 3, 112, 112)).shape == (2, 7)


# --- 4. tracebacks and lost work -----------------------------------------------------------------------------
UNWRITABLE = Path("/proc/edgeguard-unwritable")  # not writable even for root


@pytest.mark.parametrize("cmd", [
    ["train", "--domain", "mnist_sample", "--epochs", "1", "--out", str(UNWRITABLE / "m.safetensors")],
    ["protect", "--method", "magnitude", "--source-model", "SRC", "--out", str(UNWRITABLE / "p.safetensors")],
    ["evaluate", "SRC", "--target", "usps_sample", "--report", str(UNWRITABLE / "r")],
    ["build", "SRC", "--out", str(UNWRITABLE / "b")],
    ["keygen", "--out", str(UNWRITABLE / "k")],
])
def test_unwritable_output_is_one_line_before_any_compute(cmd, sample_model, monkeypatch):
    import edgeguard.source as source

    monkeypatch.setattr(source, "train_classifier", lambda *a, **k: pytest.fail("trained before the check"))
    r = CliRunner().invoke(main, [str(sample_model) if a == "SRC" else a for a in cmd])
    assert r.exit_code == 2 and "cannot write" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_output_under_a_file_is_refused(tmp_path, sample_model):
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["evaluate", str(sample_model), "--target", "usps_sample", "--report",
                                  str(tmp_path / "afile" / "r")])
    assert r.exit_code == 2 and "is a file" in r.output


def test_interrupt_hints_name_options_the_command_has(tmp_path, sample_model, monkeypatch):
    import edgeguard.evaluation.runner as runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate_model", interrupted)
    r = CliRunner().invoke(main, ["evaluate", str(sample_model), "--target", "usps_sample", "--report",
                                  str(tmp_path / "r")])
    assert r.exit_code == 130 and "--resume" not in r.output and "runs.jsonl" in r.output, r.output
    import edgeguard.build as build_mod

    monkeypatch.setattr(build_mod, "build", interrupted)
    r = CliRunner().invoke(main, ["build", str(sample_model), "--out", str(tmp_path / "b")])
    assert r.exit_code == 130 and "--resume" not in r.output


def test_failed_evaluation_removes_the_report_folder_it_created(tmp_path, sample_model):
    folder = _write_folder(tmp_path / "words", NAMES, per_class=2)
    report = tmp_path / "reports" / "r"
    r = CliRunner().invoke(main, ["evaluate", str(sample_model), "--target", f"imagefolder:{folder}", "--report",
                                  str(report), "--device", "cpu"])
    assert r.exit_code == 2 and not report.exists(), r.output


# --- 5. set-up weight ----------------------------------------------------------------------------------------
def test_demo_output_is_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", "edgeguard-demo/report/report.md"], cwd=REPO)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0


def test_ci_script_names_only_files_the_repository_has():
    text = (REPO / ".ci" / "run").read_text()
    for name in ("DEVELOPERS.md",):
        assert name not in text or (REPO / name).exists()
