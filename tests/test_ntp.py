"""NTP on real data with small_cnn (MNIST → USPS)."""
import pytest
import torch

from edgeguard.artifact import load_artifact
from edgeguard.inputspec import DIGITS_INPUT
from edgeguard.methods.ntp import NtpConfig, NtpExperimental, fisher_ratio, project_topk
from edgeguard.protect import protect

FAST = dict(iterations=6, epochs=1, source_fraction=0.1, target_fraction=0.2, head_epochs=2, recovery_epochs=3,
            recovery_lr=1e-3)


def protect_ntp(source, out, cfg):
    return protect("ntp", source, out, target="usps", config=cfg, device="cpu")


@pytest.fixture(scope="module")
def ntp_model(mnist_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ntp") / "ntp.safetensors"
    summary = protect_ntp(mnist_model, out, NtpConfig(sparsity=0.8, **FAST))
    return out, summary


def test_sparsity_is_exact_and_masked_weights_zero(ntp_model):
    out, s = ntp_model
    art = load_artifact(out)  # loading verifies every masked weight is 0
    assert abs(art.mask.sparsity() - 0.8) <= 0.001
    state = art.model.state_dict()
    for name, keep in art.mask.masks.items():
        assert name.startswith("encoder.")
        assert torch.all(state[name][~keep] == 0)
        assert keep.any(), f"layer {name} pruned away"


def test_source_kept_target_lost(ntp_model):
    _, s = ntp_model
    assert s.source.before - s.source.after <= 0.02
    assert s.accuracy("usps").after <= 0.30


def test_projection_hits_sparsity_with_floor():
    torch.manual_seed(0)
    vals = {"a": torch.randn(100) * 10, "b": torch.randn(1000) * 0.01}
    keep = project_topk(vals, 0.9, floor=0.02)
    total = sum(int(k.sum()) for k in keep.values())
    assert total == 110
    assert int(keep["b"].sum()) >= 20  # the small-magnitude layer keeps its floor


def test_fisher_ratio_handles_missing_classes():
    f = torch.randn(8, 5, requires_grad=True)
    assert fisher_ratio(f, torch.zeros(8, dtype=torch.long)).item() == 0.0  # one class: no between-class term
    r = fisher_ratio(f, torch.tensor([0, 0, 3, 3, 3, 7, 7, 7]))
    r.backward()
    assert r.item() > 0 and f.grad is not None


def test_simulated_attack_learns_respects_the_mask_and_leaves_the_model_alone(mnist_model, data_root):
    """The recovery's simulated attack really fine-tunes (the inner loss falls), holds pruned weights at zero,
    differentiates back to the starting weights, and changes neither the weights nor the BN statistics."""
    import torch.nn.functional as F

    from edgeguard.domains import get_domain
    from edgeguard.finetune.unrolled import simulated_attack_loss
    from edgeguard.training import normalize

    model = load_artifact(mnist_model).model.train()
    usps = get_domain("usps", str(data_root))
    x = normalize(torch.from_numpy(usps.train_x[:64]).float(), DIGITS_INPUT)
    y = torch.from_numpy(usps.train_y[:64]).long()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        start = F.cross_entropy(model(x), y).item()
    model.load_state_dict(before)  # that forward moved the BN running statistics
    after = simulated_attack_loss(model, x, y, x, y, steps=3, lr=0.01)
    assert after.item() < start - 0.1
    after.backward()
    first = model.encoder[0].weight
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    frozen = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # every weight "pruned"
    with torch.no_grad():
        still = simulated_attack_loss(model, x, y, x, y, steps=3, lr=0.01, keep=frozen)
    model.load_state_dict(before)
    with torch.no_grad():
        plain = F.cross_entropy(model(x), y)
    assert torch.allclose(still, plain, atol=1e-5)


def test_bad_simulation_settings_are_clear_errors():
    from edgeguard.config import apply_overrides
    from edgeguard.errors import EdgeguardError

    with pytest.raises(EdgeguardError, match="sim_weight must be"):
        NtpConfig(experimental=NtpExperimental(sim_weight=-1)).validate()
    with pytest.raises(EdgeguardError, match="not one of masked, free, both"):
        apply_overrides(NtpConfig(), ["experimental.sim_attack=regrow"])


def test_simulated_attack_term_makes_the_recovered_model_harder_to_fine_tune(mnist_model, data_root, tmp_path):
    """With sim_weight the recovery leaves a model whose (simulated) fine-tuned target loss on held-out USPS
    images is higher than after the plain recovery; the mask contract still holds."""
    from edgeguard.domains import get_domain
    from edgeguard.finetune.unrolled import simulated_attack_loss
    from edgeguard.training import normalize

    base = {**FAST, "iterations": 3, "head_epochs": 1, "recovery_epochs": 1}  # sim − plain: 2.26 (2 epochs: 4.21)
    plain, sim = tmp_path / "plain.safetensors", tmp_path / "sim.safetensors"
    protect_ntp(mnist_model, plain, NtpConfig(sparsity=0.8, **base))
    protect_ntp(mnist_model, sim, NtpConfig(sparsity=0.8, experimental=NtpExperimental(sim_weight=1.0, sim_clip=10.0),
                                           **base))
    usps = get_domain("usps", str(data_root))
    x = normalize(torch.from_numpy(usps.test_x[:256]), DIGITS_INPUT)
    y = torch.from_numpy(usps.test_y[:256]).long()
    attacked = {}
    for name, path in (("plain", plain), ("sim", sim)):
        art = load_artifact(path)  # verifies every masked weight is 0
        assert abs(art.mask.sparsity() - 0.8) <= 0.001
        keep = {n: m.float() for n, m in art.mask.masks.items()}
        attacked[name] = simulated_attack_loss(art.model.train(), x[:128], y[:128], x[128:], y[128:], 5, 0.01,
                                               keep).item()
    assert attacked["sim"] > attacked["plain"] + 0.5, attacked
