import json
import struct

import pytest
import torch

from edgeguard.artifact import build_meta, load_artifact, read_meta, save_artifact
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
    meta = build_meta(model, arch="small_cnn", classes=[str(i) for i in range(10)], source_domain="mnist",
                      method="test")
    path = save_artifact(tmp_path / "m.safetensors", model, meta, mask)
    return path, model, mask


def test_roundtrip_bakes_mask(saved):
    path, model, mask = saved
    art = load_artifact(path)
    assert art.meta["mask"]["sha256"] == mask.sha256()
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
        read_meta(path)


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
