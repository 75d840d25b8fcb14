"""The differentiable fine-tuning run: optimizer steps unrolled with `torch.func`, so a loss along or after them
has a gradient with respect to the starting weights (second order). NTP's simulated-attack recovery and the
hardening's exact meta-gradients (few-shot attacks) use it.

Every optimizer family a recipe may name is written here as a differentiable update with torch's rule and
defaults (`training.make_optimizer` builds the same optimizers for real runs)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..training import ADAGRAD_EPS, ADAM_BETAS, ADAM_EPS, RMS_ALPHA, TrainConfig, lr_factor

FLOOR = 0.1  # the backward pass's normaliser: at least this share of its tensor's mean


def _normalised(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """num / denom as the optimizer computes it, differentiated through `num` only with the normaliser held
    constant and floored at FLOOR × its tensor's mean: the derivative of 1/√v (v → 0 for masked, dead or
    sign-flipping weights) is ~1e26 on cnn32 and drowns the meta-gradient (RESULTS "Hardening v2")."""
    denom = denom.detach()
    held = num / denom.clamp_min(FLOOR * float(denom.mean()))
    return held + (num.detach() / denom - held).detach()


def diff_update(cfg: TrainConfig, p: torch.Tensor, g: torch.Tensor, state: tuple, step: int, lr: float
                ) -> tuple[torch.Tensor, tuple]:
    """One optimizer step of `cfg.optimizer` on one tensor, its value exactly torch's, kept in the autograd graph
    (SGD exactly; the adaptive families with their second-moment normaliser held, `_normalised`).
    `state` is () before the first step; `step` counts from 1."""
    family, wd = cfg.optimizer, cfg.weight_decay
    if family == "adamw":
        p = p * (1 - lr * wd)  # decoupled decay, before the update
    elif wd:
        g = g + wd * p
    if family == "sgd":
        buf = g if not state else cfg.momentum * state[0] + g
        return p - lr * buf, (buf,)
    g2 = (g * g).detach()
    if family in ("adam", "adamw"):
        m0, v0 = state or (torch.zeros_like(p), torch.zeros_like(p))
        m, v = ADAM_BETAS[0] * m0 + (1 - ADAM_BETAS[0]) * g, ADAM_BETAS[1] * v0 + (1 - ADAM_BETAS[1]) * g2
        bc1, bc2 = 1 - ADAM_BETAS[0] ** step, 1 - ADAM_BETAS[1] ** step
        return p - (lr / bc1) * _normalised(m, v.sqrt() / bc2 ** 0.5 + ADAM_EPS), (m, v)
    if family == "rmsprop":
        v = RMS_ALPHA * (state[0] if state else torch.zeros_like(p)) + (1 - RMS_ALPHA) * g2
        return p - lr * _normalised(g, v.sqrt() + ADAM_EPS), (v,)
    if family == "adagrad":
        s = (state[0] if state else torch.zeros_like(p)) + g2
        return p - lr * _normalised(g, s.sqrt() + ADAGRAD_EPS), (s,)
    raise ValueError(f"no differentiable update for optimizer {family!r}")


Probe = Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], "torch.Tensor | None"]


def unrolled_run(model: nn.Module, start: Mapping[str, torch.Tensor], cfg: TrainConfig, steps: int,
                 batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 keep: Mapping[str, torch.Tensor] | None = None, probe: Probe | None = None,
                 create_graph: bool = True) -> list[torch.Tensor]:
    """`steps` differentiable steps of `cfg`'s optimizer and schedule from `start` (name → tensor in the caller's
    graph; parameters not named keep the model's values and do not train) on `batch(t)` = (normalised x, y),
    BatchNorm in train mode as an attacker runs it, its running statistics updated on a copy. With `keep`
    (a MaskSet's masks) the steps never move pruned weights. `probe(t, params, buffers)` is called after
    step t (and at t = 0) and may return a loss; the list of returned losses is the result, each
    differentiable with respect to `start` when `create_graph`."""
    params = dict(model.named_parameters())
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    cur = {n: start[n] for n in params if n in start}
    fixed = {n: p.detach() for n, p in params.items() if n not in start}
    state: dict[str, tuple] = {n: () for n in cur}
    losses: list[torch.Tensor] = []

    def look(t: int) -> None:
        if probe is not None:
            out = probe(t, {**cur, **fixed}, buffers)
            if out is not None:
                losses.append(out)

    look(0)
    with torch.enable_grad():  # the inner steps need gradients even when the caller only measures
        for t in range(steps):
            x, y = batch(t)
            out = functional_call(model, {**cur, **fixed, **buffers}, (x,))
            grads = torch.autograd.grad(F.cross_entropy(out.float(), y), list(cur.values()),
                                        create_graph=create_graph)
            lr = cfg.lr * lr_factor(cfg.scheduler, t, steps)
            nxt = {}
            for (n, p), g in zip(cur.items(), grads):
                if keep is not None and n in keep:
                    g = g * keep[n]
                nxt[n], state[n] = diff_update(cfg, p, g, state[n], t + 1, lr)
            cur = nxt
            look(t + 1)
    return losses


def simulated_attack_loss(model: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, x_out: torch.Tensor,
                          y_out: torch.Tensor, steps: int, lr: float,
                          keep: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Target CE on (x_out, y_out) after `steps` differentiable plain-SGD steps on (x_in, y_in) from the model's
    current weights (NTP's simulated attack). Under no_grad (measuring only) the second-order graph is skipped."""
    start = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, scheduler="none")

    def probe(t: int, params: dict, buffers: dict) -> torch.Tensor | None:
        if t < steps:
            return None
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (x_out,)).float(), y_out)

    return unrolled_run(model, start, cfg, steps, lambda t: (x_in, y_in), keep, probe, torch.is_grad_enabled())[0]
