import json
import struct

import pytest
import torch

from edgeguard.artifact import load_artifact, read_card, save_artifact
from edgeguard.card import ModelCard
from edgeguard.errors import CheckFailed, EdgeguardError
from edgeguard.masks import MaskSet
from edgeguard.models import create_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn")
    mask = MaskSet.ones(model)
    for v in mask.masks.values():
        v[torch.rand(v.shape) < 0.3] = False
    card = ModelCard(arch="small_cnn", classes=[str(i) for i in range(10)], source_domain="mnist", method="test")
    path = save_artifact(tmp_path / "m.safetensors", model, card, mask)
    return path, model, mask


def test_roundtrip_bakes_mask(saved):
    path, model, mask = saved
    art = load_artifact(path)
    assert art.card.mask.sha256 == mask.sha256() and art.card.method == "test"
    x = torch.randn(4, 3, 32, 32)
    ref = create_model("small_cnn")
    ref.load_state_dict(model.state_dict())
    mask.bake_(ref)
    ref.eval()
    assert torch.allclose(art.model(x), ref(x), atol=1e-6)
    for name in mask:
        assert torch.all(dict(art.model.named_parameters())[name][~art.mask[name]] == 0)


def test_truncated_file_refused(saved):
    path, *_ = saved
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(EdgeguardError, match="truncated"):
        load_artifact(path)
    path.write_bytes(data[:5])
    with pytest.raises(EdgeguardError, match="too short"):
        load_artifact(path)


def _rewrite(path, edit_meta=None, edit_state=None):
    from safetensors.torch import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    md = json.loads(data[8 : 8 + n])["__metadata__"]
    state = load(data)
    if edit_meta:
        edit_meta(md)
    if edit_state:
        edit_state(state)
    path.write_bytes(save(state, metadata=md))


def test_unknown_version_refused(saved):
    path, *_ = saved
    _rewrite(path, edit_meta=lambda md: md.update(edgeguard_format="9"))
    with pytest.raises(EdgeguardError, match="version '9' is not supported"):
        read_card(path)


def test_nonzero_masked_weight_refused(saved):
    path, model, mask = saved
    from safetensors.torch import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    md = json.loads(data[8 : 8 + n])["__metadata__"]
    state = load(data)
    name = next(iter(mask))
    w = state[name].clone()
    idx = (~mask[name]).nonzero()[0]
    w[tuple(idx)] = 0.5
    state[name] = w
    path.write_bytes(save(state, metadata=md))
    with pytest.raises(CheckFailed, match="masked weights are not 0"):
        load_artifact(path)


def test_not_an_artifact(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(EdgeguardError, match="not an edgeguard model"):
        load_artifact(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(EdgeguardError):
        load_artifact(tmp_path / "junk.safetensors")


def _edit_card(path, edit):
    def f(md):
        card = json.loads(md["edgeguard"])
        edit(card)
        md["edgeguard"] = json.dumps(card)
    _rewrite(path, edit_meta=f)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(classes="0123456789"), lambda c: c.pop("classes"), lambda c: c.update(input=None),
    lambda c: c["input"].update(mean=[0.5]), lambda c: c["input"].update(scale="1/255"),
    lambda c: c.update(method_config=None), lambda c: c["mask"].update(layout=7),
    lambda c: c["mask"].update(layout=[["encoder.0.weight", "3x3"]]), lambda c: c["mask"].update(sha256=[1]),
    lambda c: c.update(accuracies=[{"domain": "mnist", "role": "source", "after": 1e400}]),
    lambda c: c.update(accuracies={"source_after": 0.9}), lambda c: c.update(arch=["small_cnn"]),
    lambda c: c.update(target_domains=[None]), lambda c: c["mask"].update(kept="10"),
])
def test_edited_card_is_a_one_line_error(saved, edit):
    """Every edited field is refused with a message naming it, never a traceback from deep inside."""
    path, *_ = saved
    _edit_card(path, edit)
    with pytest.raises(EdgeguardError) as e:
        load_artifact(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_format_1_file_is_upgraded_on_read(saved):
    """A file written by the previous release (a free metadata dict with `target_before:NAME` keys) still loads."""
    path, model, mask = saved

    def to_v1(md):
        card = json.loads(md["edgeguard"])
        card["accuracies"] = {"source_before": 0.99, "source_after": 0.98, "target_before:usps": 0.6,
                              "target_after:usps": 0.1}
        card["num_classes"] = 10
        md.update(edgeguard_format="1", edgeguard=json.dumps(card))
    _rewrite(path, edit_meta=to_v1)
    card = load_artifact(path).card
    assert card.source_accuracy.before == 0.99 and card.source_accuracy.after == 0.98
    assert card.accuracy("usps", "target").after == 0.1 and card.mask.sha256 == mask.sha256()
