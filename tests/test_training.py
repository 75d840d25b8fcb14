import torch

from edgeguard.domains import get_domain
from edgeguard.models import create_model
from edgeguard.training import TensorData, TrainConfig, augment, evaluate, train_classifier


def _data(n=600):
    d = get_domain("mnist_sample")
    return (TensorData.from_numpy(d.train_x[:n], d.train_y[:n]), TensorData.from_numpy(d.test_x, d.test_y))


def test_training_learns_real_digits():
    train, test = _data(2000)
    torch.manual_seed(0)
    model = create_model("small_cnn")
    before = evaluate(model, test)
    train_classifier(model, train, TrainConfig(epochs=6, lr=3e-3, batch_size=64, device="cpu"))
    after = evaluate(model, test)
    assert after > 0.85 and after > before + 0.5


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
    import pytest

    import edgeguard.training as tr

    train, test = _data(400)
    cfg = TrainConfig(epochs=3, lr=2e-3, batch_size=64, device="cpu", seed=3)
    torch.manual_seed(1)
    a = create_model("small_cnn")
    init = {k: v.clone() for k, v in a.state_dict().items()}
    train_classifier(a, train, cfg)

    b = create_model("small_cnn")
    b.load_state_dict(init)
    ck = tmp_path / "run.ckpt"
    real_save = tr.save_checkpoint

    def save_then_die(path, modules, opt, sched, state, cfg):
        real_save(path, modules, opt, sched, state, cfg)
        if state.epoch == 2:
            raise KeyboardInterrupt  # killed right after epoch 2 of 3

    monkeypatch.setattr(tr, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(b, train, cfg, checkpoint=ck)
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    c = create_model("small_cnn")  # a fresh process: only the checkpoint survives
    state = train_classifier(c, train, cfg, checkpoint=ck, resume=True)
    assert state.epoch == 3 and len(state.history) == 3
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), c.state_dict()[k].float(), atol=1e-6), k


def test_masked_training_keeps_zeros():
    from edgeguard.masks import MaskSet

    train, _ = _data(300)
    model = create_model("small_cnn")
    mask = MaskSet.ones(model)
    for v in mask.masks.values():
        v[torch.rand(v.shape) < 0.5] = False
    train_classifier(model, train, TrainConfig(epochs=1, device="cpu", batch_size=64), mask=mask)
    assert mask.violations(dict(model.named_parameters())) == {}


def test_augment_is_a_shift():
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, 10, 10] = 1.0
    g = torch.Generator().manual_seed(0)
    y = augment(x, g, shift=2)
    assert y.sum() == x.sum()  # a translation by ≤2 px keeps the interior pixel
    assert torch.equal(augment(x, g, shift=0), x)
