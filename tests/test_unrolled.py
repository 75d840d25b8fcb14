"""The differentiable fine-tuning run (finetune/unrolled.py) on real USPS images: each optimizer family's update is
torch's own, and the exact meta-gradient through an unrolled attack equals a finite-difference estimate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from edgeguard.domains import get_domain
from edgeguard.finetune.unrolled import diff_update, unrolled_run
from edgeguard.optim_names import OPTIMIZERS
from edgeguard.training import TrainConfig, make_optimizer


def _tiny() -> nn.Module:
    """Conv + BN + GELU + linear head: smooth, so a central difference is well defined (ReLU's kinks make it
    jump by orders of magnitude at some step sizes)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.GELU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 10)).double()


@pytest.fixture(scope="module")
def usps(data_root):
    d = get_domain("usps", data_root)
    x = torch.from_numpy(d.train_x[:48]).double() / 255
    return x, torch.from_numpy(d.train_y[:48]).long()


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_each_differentiable_update_is_torchs(family, usps):
    """Five steps of `diff_update` and of torch's optimizer (weight decay on) from one start, on the same real
    gradients, end at the same weights."""
    x, y = usps
    model = _tiny()
    cfg = TrainConfig(optimizer=family, lr=3e-3, weight_decay=1e-2, scheduler="none")
    opt = make_optimizer(model.parameters(), cfg)
    cur = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: () for n in cur}
    for t in range(5):
        b = slice(8 * t, 8 * t + 8)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n in cur:
            cur[n], state[n] = diff_update(cfg, cur[n], grads[n], state[n], t + 1, cfg.lr)
    for n, p in model.named_parameters():
        torch.testing.assert_close(cur[n], p.detach(), rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_exact_meta_gradient_of_a_three_step_attack_matches_finite_differences(momentum, usps):
    """d(loss after a 3-step SGD attack)/d(start) along a random direction, against a central difference (rtol
    1e-2): the attack's trajectory is differentiated, not assumed fixed (first order gives another number)."""
    x, y = usps
    model = _tiny()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=momentum, weight_decay=1e-3, scheduler="none")
    held_x, held_y = x[32:], y[32:]

    def loss_after(start: dict, create_graph: bool = True) -> torch.Tensor:
        def probe(t, params, buffers):
            return F.cross_entropy(functional_call(model, {**params, **buffers}, (held_x,)), held_y) if t == 3 else None

        start = {n: v.detach().clone().requires_grad_(True) for n, v in start.items()}
        return unrolled_run(model, start, cfg, 3, lambda t: (x[:16], y[:16]), probe=probe,
                            create_graph=create_graph)[0]

    base = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = unrolled_run(model, base, cfg, 3, lambda t: (x[:16], y[:16]),
                        probe=lambda t, params, buffers: F.cross_entropy(
                            functional_call(model, {**params, **buffers}, (held_x,)), held_y) if t == 3 else None)[0]
    grads = torch.autograd.grad(loss, list(base.values()))
    gen = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in base.items()}
    exact = sum(float((g * direction[n]).sum()) for n, g in zip(base, grads))
    eps = 1e-5
    plus = loss_after({n: p + eps * direction[n] for n, p in start.items()}, False)
    minus = loss_after({n: p - eps * direction[n] for n, p in start.items()}, False)
    fd = float((plus - minus).detach()) / (2 * eps)
    assert exact == pytest.approx(fd, rel=1e-2), (exact, fd)
    # first order (the weights after the attack moved like the start) gives another number here
    first = {n: p.detach().clone().requires_grad_(True) for n, p in base.items()}
    end = {}

    def keep_end(t, params, buffers):
        if t == 3:
            end.update({n: v.detach() for n, v in params.items()})

    unrolled_run(model, first, cfg, 3, lambda t: (x[:16], y[:16]), probe=keep_end, create_graph=False)
    at_end = {n: v.clone().requires_grad_(True) for n, v in end.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    fo = torch.autograd.grad(F.cross_entropy(functional_call(model, {**at_end, **buffers}, (held_x,)), held_y),
                             list(at_end.values()))
    first_order = sum(float((g * direction[n]).sum()) for n, g in zip(at_end, fo))
    assert abs(first_order - fd) > 0.02 * abs(fd), (first_order, fd)


@pytest.mark.parametrize("family", ["adam", "adamw", "rmsprop", "adagrad"])
def test_adaptive_families_give_a_finite_meta_gradient_where_weights_are_masked(family, usps):
    """Half of the conv weights pruned and held at 0 (their second moment stays 0): the meta-gradient through
    8 steps stays finite and of the order of the first-order one (the raw 1/√v derivative there is ~1e26)."""
    x, y = usps
    model = _tiny().float()
    conv = model[0].weight
    keep = {"0.weight": conv.detach().abs() >= conv.detach().abs().median()}
    with torch.no_grad():
        conv.mul_(keep["0.weight"])
    cfg = TrainConfig(optimizer=family, lr=1e-2 if family == "adagrad" else 1e-3, scheduler="none")
    start = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def probe(t, params, buffers):
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (x[32:].float(),)), y[32:]) if t == 8 else None

    loss = unrolled_run(model, start, cfg, 8, lambda t: (x[:16].float(), y[:16]), keep=keep, probe=probe)[0]
    grads = torch.autograd.grad(loss, list(start.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert torch.isfinite(norm) and 1e-4 < float(norm) < 1e3, float(norm)
