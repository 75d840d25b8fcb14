"""Camera-resolution models (issue 29): PACS, folders decoded once at the model's input, the vendor's own
model, and the whole chain at 64 px. Real data (PACS JPEGs) or fixtures made from it; small and CPU-only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.inputspec import make_input, natural_input

PACS_COUNTS = {"pacs_photo": [189, 202, 182, 186, 199, 280, 432], "pacs_art": [379, 255, 285, 184, 201, 295, 449],
               "pacs_cartoon": [389, 457, 346, 135, 324, 288, 405], "pacs_sketch": [772, 740, 753, 608, 816, 80, 160]}
SMALL = natural_input(32)  # PACS decoded small: counts and splits do not depend on the size


def _pacs(data_root: Path) -> Path:
    if not (data_root / "pacs" / "photo").is_dir():
        pytest.skip("PACS not in the data root")
    return data_root / "pacs"


@pytest.mark.parametrize("name", ["pacs_photo", "pacs_sketch"])
def test_pacs_counts_and_the_persisted_stratified_split(data_root, name):
    from edgeguard.domains import get_domain
    from edgeguard.domains.folders import list_image_folder, stratified_split
    from edgeguard.domains.registry import PACS_DOMAINS

    _pacs(data_root)
    d = get_domain(name, input=SMALL)
    assert d.classes == ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    counts = np.bincount(d.train_y, minlength=7) + np.bincount(d.test_y, minlength=7)
    assert counts.tolist() == PACS_COUNTS[name]
    assert (np.abs(np.bincount(d.test_y, minlength=7) - 0.2 * counts) <= 0.5).all()  # stratified
    fl = list_image_folder(data_root / "pacs" / PACS_DOMAINS[name])
    split = json.loads(next(Path(p) for p in _entries(name)).joinpath("split.json").read_text())
    again = stratified_split(fl.rel(), fl.labels)
    assert sorted(split["test"]) == sorted(r for r, t in zip(fl.rel(), again) if t)  # the same on every machine


def _entries(name: str) -> list[Path]:
    from edgeguard.cache import cache_dir

    return sorted(p for p in cache_dir("domains").glob(f"{name}-*") if (p / "done").exists())


def _small_folder(root: Path, pacs: Path, domain: str, per_class: int, classes=("dog", "guitar", "house")) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((pacs / domain / c).iterdir())[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


def test_folder_cache_is_reused_rebuilt_on_change_and_skips_a_corrupt_jpeg(tmp_path, data_root, caplog):
    from edgeguard.domains import get_domain, registry

    folder = _small_folder(tmp_path / "f", _pacs(data_root), "photo", 10)
    name = f"imagefolder:{folder}"
    spec = natural_input(48)
    a = get_domain(name, input=spec)
    assert a.train_x.shape[1:] == (3, 48, 48) and len(a.train_y) + len(a.test_y) == 30
    registry._MEMO.clear()
    entries = sorted(registry._cache_dir().glob("imagefolder_*"))
    b = get_domain(name, input=spec)  # from the cache entry: no new entry, same arrays
    assert sorted(registry._cache_dir().glob("imagefolder_*")) == entries and np.array_equal(a.train_x, b.train_x)
    bad = folder / "dog" / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    c = get_domain(name, input=spec)  # the folder changed: decoded again, the corrupt file named and left out
    assert len(sorted(registry._cache_dir().glob("imagefolder_*"))) == len(entries) + 1
    assert len(c.train_y) + len(c.test_y) == 30 and "zz_corrupt.jpg" in caplog.text


def test_runtime_decoder_is_the_hosts(tmp_path, data_root):
    """A camera JPEG reaches the model through the same resize and crop on the host and on the device."""
    from edgeguard.domains import get_domain
    from runtime.imagefile import decode_image

    folder = _small_folder(tmp_path / "g", _pacs(data_root), "cartoon", 2, classes=("dog", "horse"))
    spec = make_input(40, resize="center-crop", crop=0.875, base=natural_input(40))
    d = get_domain(f"imagefolder:{folder}", input=spec)
    files = sorted(folder.rglob("*.jpg"))
    decoded = {decode_image(f, spec.shape, spec.resize, spec.crop).tobytes() for f in files}
    assert {x.tobytes() for x in np.concatenate([d.train_x, d.test_x])} == decoded


# --- the vendor's own model ----------------------------------------------------------------------------------
def _vendor_files(tmp_path: Path, num_classes: int = 3):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    m = resnet18(weights=None, num_classes=num_classes).eval()
    for bn in m.modules():  # non-trivial running statistics, as a trained model has
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    torch.save(m.state_dict(), tmp_path / "vendor.pt")
    (tmp_path / "classes.txt").write_text("dog\nguitar\nhouse\n")
    return m


def test_imported_torchvision_model_keeps_its_outputs_and_exports_back(tmp_path, data_root):
    from torchvision.models import resnet18

    from edgeguard.artifact import load_artifact
    from edgeguard.models.imported import vendor_state_dict
    from edgeguard.training import normalize

    vendor = _vendor_files(tmp_path)
    folder = _small_folder(tmp_path / "src", _pacs(data_root), "photo", 5)
    r = CliRunner().invoke(main, ["import", str(tmp_path / "vendor.pt"), "--arch", "torchvision:resnet18",
                                  "--classes", str(tmp_path / "classes.txt"), "--source", f"imagefolder:{folder}",
                                  "--input-size", "64", "--mean", "0.5 0.4 0.3", "--std", "0.2 0.25 0.3",
                                  "--out", str(tmp_path / "m.safetensors"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["head"] == "fc" and "layer4" in summary["encoder"]
    art = load_artifact(tmp_path / "m.safetensors")
    spec = art.card.input
    assert spec.shape == (3, 64, 64) and spec.mean == (0.5, 0.4, 0.3) and spec.std == (0.2, 0.25, 0.3)
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(art.model.eval()(normalize(x, spec)), vendor(normalize(x, spec)))
        back = resnet18(weights=None, num_classes=3).eval()
        back.load_state_dict(vendor_state_dict(art.model))
        assert torch.equal(back(normalize(x, spec)), vendor(normalize(x, spec)))


@pytest.mark.parametrize("case, says", [("arch", "torchvision has no model"), ("head", "no such layer"),
                                        ("classes", "do not fit"), ("pickle", "weights_only")])
def test_malformed_import_is_one_line_and_exit_2(tmp_path, case, says):
    vendor = _vendor_files(tmp_path)
    weights, classes = tmp_path / "vendor.pt", tmp_path / "classes.txt"
    arch = ["--arch", "torchvision:not_a_net" if case == "arch" else "torchvision:resnet18"]
    if case == "head":
        arch += ["--head", "layer9"]
    if case == "classes":  # a class list longer than the model's outputs
        classes.write_text("a\nb\nc\nd\n")
    if case == "pickle":  # the whole module: only unpickling could read it
        weights = tmp_path / "whole.pt"
        torch.save(vendor, weights)
    r = CliRunner().invoke(main, ["import", str(weights), *arch, "--classes", str(classes), "--source",
                                  "mnist_sample", "--input-size", "64", "--out", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2, r.output
    assert says in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


# --- the chain at 64 px ------------------------------------------------------------------------------------
def test_a_64px_model_through_train_protect_build_validate_predict(tmp_path, data_root):
    pacs = _pacs(data_root)
    src = _small_folder(tmp_path / "photo", pacs, "photo", 24)
    tgt = _small_folder(tmp_path / "art", pacs, "art_painting", 24)
    run = CliRunner().invoke
    m, p, b = tmp_path / "m.safetensors", tmp_path / "p.safetensors", tmp_path / "bundle"
    r = run(main, ["train", "--arch", "small_cnn", "--domain", f"imagefolder:{src}", "--input-size", "64",
                   "--epochs", "4", "--out", str(m), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = run(main, ["protect", "--method", "magnitude", "--source-model", str(m), "--target", f"imagefolder:{tgt}",
                   "--set", "sparsity=0.3", "--out", str(p), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = run(main, ["build", str(p), "--out", str(b), "--samples", "20", "--allow-weak"])
    assert r.exit_code == 0, r.output
    from runtime.cli import main as runtime_main

    assert runtime_main(["validate", str(b), "--allow-unsigned"]) == 0
    jpgs = sorted(src.rglob("*.jpg"))[:6]
    assert runtime_main(["predict", str(b), *map(str, jpgs), "--allow-unsigned", "--report",
                         str(tmp_path / "pred.json")]) == 0
    device = [p["index"] for p in json.loads((tmp_path / "pred.json").read_text())["predictions"]]
    from edgeguard.artifact import load_artifact
    from edgeguard.training import predict_logits
    from runtime.imagefile import decode_image

    art = load_artifact(p)
    spec = art.card.input
    x = torch.from_numpy(np.stack([decode_image(f, spec.shape, spec.resize, spec.crop) for f in jpgs]))
    assert predict_logits(art.model, x).argmax(1).tolist() == device  # host and device agree on camera files


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "vgg11"])
def test_architectures_build_at_camera_sizes_and_carry_their_input(arch):
    from edgeguard.models import create_model
    from edgeguard.models.registry import input_of

    spec = natural_input(96)
    model = create_model(arch, 7, input_spec=spec).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *spec.shape)).shape == (2, 7)
    assert input_of(model) == spec


def test_imported_timm_model_from_safetensors_keeps_its_outputs(tmp_path, data_root):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from edgeguard.artifact import load_artifact
    from edgeguard.training import normalize

    torch.manual_seed(0)
    vendor = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    save_file({k: v.contiguous() for k, v in vendor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "classes.txt").write_text("dog\nguitar\nhouse\n")
    folder = _small_folder(tmp_path / "src", _pacs(data_root), "photo", 3)
    r = CliRunner().invoke(main, ["import", str(tmp_path / "w.safetensors"), "--arch", "timm:resnet10t", "--classes",
                                  str(tmp_path / "classes.txt"), "--source", f"imagefolder:{folder}",
                                  "--input-size", "64", "--out", str(tmp_path / "m.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    art = load_artifact(tmp_path / "m.safetensors")
    assert art.model.head_name == "fc" and art.card.arch == "timm:resnet10t"
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(art.model.eval()(normalize(x, art.card.input)), vendor(normalize(x, art.card.input)))
