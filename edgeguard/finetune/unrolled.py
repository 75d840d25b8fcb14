"""The differentiable fine-tuning run: a few plain SGD steps unrolled with `torch.func`, so a loss after them
has a gradient with respect to the starting weights (second order). NTP's simulated-attack recovery uses it;
exact meta-gradients through an attack (issue 31) build on it."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def simulated_attack_loss(model: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, x_out: torch.Tensor,
                          y_out: torch.Tensor, steps: int, lr: float,
                          keep: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Target CE on (x_out, y_out) after `steps` differentiable SGD steps on (x_in, y_in) from the model's
    current weights, BN in train mode as an attacker runs it. With `keep` (a MaskSet's masks) the steps never
    move pruned weights (the masked attack). Second order: the gradient reaches the starting weights."""
    params = dict(model.named_parameters())
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # the attack's BN updates stay here
    cur = {n: p for n, p in params.items() if p.requires_grad}
    fixed = {n: p for n, p in params.items() if not p.requires_grad}
    second_order = torch.is_grad_enabled()  # under no_grad (measuring only) skip the second-order graph
    with torch.enable_grad():  # the inner steps need gradients even when the caller only measures
        for _ in range(steps):
            out = functional_call(model, {**cur, **fixed, **buffers}, (x_in,))
            grads = torch.autograd.grad(F.cross_entropy(out.float(), y_in), list(cur.values()),
                                        create_graph=second_order)
            cur = {n: p - lr * (g * keep[n] if keep is not None and n in keep else g)
                   for (n, p), g in zip(cur.items(), grads)}
    out = functional_call(model, {**cur, **fixed, **buffers}, (x_out,))
    return F.cross_entropy(out.float(), y_out)
