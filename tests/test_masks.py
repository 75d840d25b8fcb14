import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgeguard.errors import CheckFailed
from edgeguard.masks import MaskSet, apply_n_m, is_n_m, prunable_names
from edgeguard.models import create_model
from runtime import maskbits

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(st.lists(shapes, min_size=0, max_size=5), st.randoms(use_true_random=False))
def test_pack_unpack_roundtrip(shape_list, rnd):
    masks = {f"layer{i}.weight": np.array([rnd.random() < 0.5 for _ in range(int(np.prod(s)))]).reshape(s)
             for i, s in enumerate(shape_list)}
    bits, layout = maskbits.pack(masks)
    assert len(bits) == (sum(m.size for m in masks.values()) + 7) // 8
    out = maskbits.unpack(bits, layout)
    assert set(out) == set(masks)
    for k in masks:
        assert np.array_equal(out[k], masks[k])
    with pytest.raises(ValueError):
        maskbits.unpack(bits + b"\x00", layout)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
              elements=st.floats(-10, 10, width=32)),
       arrays(bool, st.tuples(st.integers(1, 6), st.integers(1, 9))))
def test_bake_zeroes_exactly_masked_and_keeps_the_rest(w, m):
    if w.shape != m.shape:
        m = np.resize(m, w.shape)
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    ms = MaskSet({"weight": torch.from_numpy(m.copy())})
    ms.bake_(lin)
    baked = lin.weight.detach().numpy()
    assert np.all(baked[~m] == 0)
    assert np.array_equal(baked[m], w[m])  # bit-identical where kept
    assert ms.violations(dict(lin.named_parameters())) == {}


def test_sparsity_hash_and_verify():
    model = create_model("small_cnn")
    names = prunable_names(model)
    assert all(n.endswith(".weight") for n in names) and "head.2.weight" in names
    assert prunable_names(model, "encoder") == [n for n in names if n.startswith("encoder.")]
    ms = MaskSet.ones(model)
    assert ms.sparsity() == 0.0
    first = names[0]
    ms.masks[first][0] = False
    per = ms.sparsity_per_layer()
    assert per[first] > 0 and 0 < ms.sparsity() < per[first]
    h1 = ms.sha256()
    ms.masks[first][1] = False
    assert ms.sha256() != h1
    with pytest.raises(CheckFailed, match="not 0"):
        ms.verify(dict(model.named_parameters()))
    ms.bake_(model)
    ms.verify(dict(model.named_parameters()))
    back = MaskSet.unpack(*ms.pack())
    assert all(torch.equal(back[k], ms[k]) for k in ms)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(0, 10_000))
def test_two_four_pattern(out_c, in_c, k, seed):
    scores = torch.randn(out_c, in_c, k, k, generator=torch.Generator().manual_seed(seed))
    mask = apply_n_m(scores, 2, 4)
    assert is_n_m(mask, 2, 4)
    flat = mask.reshape(out_c, -1)
    full = flat.shape[1] - flat.shape[1] % 4
    if full:
        assert int(flat[:, :full].sum()) == out_c * full // 2
