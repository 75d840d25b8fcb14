"""The stacked fine-tuning engine: K runs of one architecture trained as one model.

Every parameter and BatchNorm buffer carries a leading run dimension; run k's activations are channel block
k of one tensor. On CUDA convolutions run grouped (one kernel for all runs); on a CPU, where grouping gains
nothing, each run's block goes through its own conv, the same kernel a run alone uses. Linear layers run as
a batched matmul, BatchNorm per channel. Each run keeps its own subset, batch order
and augmentation (drawn from its own (seed, epoch) generator, as `train_classifier` draws them), its own
start weights, mask, learning rate and optimizer state, so it follows the trajectory it would follow alone.
Runs need not share a step count or batch size: each tick trains the runs whose next batch has the size the
most runs are waiting on (ragged stacking), so small ratios ride along with large ones.

An architecture whose forward mixes runs (anything but conv, BatchNorm, linear and per-channel ops) is
detected at build time by comparing the stack's output with each run's own model; such a model trains one
run after another instead, with one log line saying so. Dropout masks are drawn for the whole stack, so a
model with dropout matches its sequential runs in distribution, not bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast, resolve_device
from ..errors import EdgeguardError
from ..inputspec import InputSpec
from ..models.registry import input_of
from ..training import (
    ADAGRAD_EPS,
    ADAM_BETAS,
    ADAM_EPS,
    RMS_ALPHA,
    TrainConfig,
    epoch_generator,
    iterate_batches,
    lr_factor,
    recipe_input,
)
from .run import StackRun

log = logging.getLogger(__name__)

# Modules without parameters that act per channel or per element, and containers whose forward only wires
# their children (checked again numerically at build time).
_PASSTHROUGH = {"ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "GELU", "Sigmoid", "Tanh", "Identity",
                "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Flatten", "Dropout",
                "Sequential", "Classifier", "BasicBlock", "Bottleneck", "InvertedResidual", "SqueezeExcitation",
                "Conv2dNormActivation"}


class _Active:
    """Which runs the current tick trains: `idx` (a LongTensor) or None for all."""

    def __init__(self, k: int):
        self.k = k
        self.idx: torch.Tensor | None = None

    def count(self) -> int:
        return self.k if self.idx is None else int(self.idx.numel())

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.idx is None else t.index_select(0, self.idx)


class _StackedConv(nn.Module):
    def __init__(self, convs: list[nn.Conv2d], active: _Active):
        super().__init__()
        c = convs[0]
        self.active, self.groups, self.stride, self.padding, self.dilation = (active, c.groups, c.stride,
                                                                              c.padding, c.dilation)
        if c.padding_mode != "zeros":
            raise _Unstackable(f"conv padding mode {c.padding_mode}")
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in convs]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in convs]).clone()) if c.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active.count()
        w = self.active.pick(self.weight)
        w = w.reshape(k * w.shape[1], *w.shape[2:])
        b = self.active.pick(self.bias).reshape(-1) if self.bias is not None else None
        if x.device.type == "cpu":  # one conv per run: the kernels a run alone uses, so it matches bit for bit
            ws, xs = w.chunk(k), x.chunk(k, dim=1)
            bs = b.chunk(k) if b is not None else [None] * k
            return torch.cat([F.conv2d(xi, wi, bi, self.stride, self.padding, self.dilation, self.groups)
                              for xi, wi, bi in zip(xs, ws, bs)], dim=1)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups * k)


class _StackedBatchNorm(nn.Module):
    def __init__(self, bns: list[nn.BatchNorm2d], active: _Active):
        super().__init__()
        b = bns[0]
        if not (b.affine and b.track_running_stats and b.momentum is not None):
            raise _Unstackable("BatchNorm without affine parameters, running statistics or a momentum")
        self.active, self.eps, self.momentum = active, b.eps, b.momentum
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in bns]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in bns]).clone())
        self.register_buffer("running_mean", torch.stack([m.running_mean for m in bns]).clone())
        self.register_buffer("running_var", torch.stack([m.running_var for m in bns]).clone())
        self.register_buffer("num_batches_tracked", torch.stack([m.num_batches_tracked for m in bns]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.active.idx
        if idx is None:  # views: the running statistics update in place
            rm, rv = self.running_mean.view(-1), self.running_var.view(-1)
        else:
            rm, rv = self.running_mean[idx].reshape(-1), self.running_var[idx].reshape(-1)
        out = F.batch_norm(x, rm, rv, self.active.pick(self.weight).reshape(-1),
                           self.active.pick(self.bias).reshape(-1), self.training, self.momentum, self.eps)
        if self.training:
            if idx is not None:
                self.running_mean[idx] = rm.view(len(idx), -1)
                self.running_var[idx] = rv.view(len(idx), -1)
                self.num_batches_tracked[idx] += 1
            else:
                self.num_batches_tracked += 1
        return out


class _StackedLinear(nn.Module):
    def __init__(self, linears: list[nn.Linear], active: _Active):
        super().__init__()
        self.active = active
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]).clone())
        has_bias = linears[0].bias is not None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]).clone()) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise _Unstackable("a linear layer on a tensor that is not (batch, features)")
        k = self.active.count()
        h = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (k, batch, in)
        out = torch.bmm(h, self.active.pick(self.weight).transpose(1, 2))
        if self.bias is not None:
            out = out + self.active.pick(self.bias).unsqueeze(1)
        return out.transpose(0, 1).reshape(x.shape[0], -1)


class _Unstackable(Exception):
    pass


_STACKED = {nn.Conv2d: _StackedConv, nn.BatchNorm2d: _StackedBatchNorm, nn.Linear: _StackedLinear}


def _build(models: list[nn.Module], active: _Active) -> nn.Module:
    """A copy of models[0]'s structure in which every conv, BatchNorm and linear holds all K runs."""
    template = copy.deepcopy(models[0])
    for name, mod in list(template.named_modules()):
        if not name:
            continue
        kind = _STACKED.get(type(mod))
        if kind is not None:
            parent, _, leaf = name.rpartition(".")
            owner = template.get_submodule(parent) if parent else template
            setattr(owner, leaf, kind([m.get_submodule(name) for m in models], active))
        elif type(mod).__name__ not in _PASSTHROUGH:
            raise _Unstackable(f"module {name} ({type(mod).__name__})")
        elif any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            raise _Unstackable(f"module {name} holds its own parameters")
    if type(template).__name__ not in _PASSTHROUGH:
        raise _Unstackable(type(template).__name__)
    return template


def _stacked_forward(net: nn.Module, xs: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """xs: (k, batch, C, H, W) → logits (k, batch, classes)."""
    k, b = xs.shape[:2]
    x = xs.transpose(0, 1).reshape(b, k * xs.shape[2], *xs.shape[3:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = net(x)
    return out.reshape(b, k, -1).transpose(0, 1)


def build_stack(models: list[nn.Module], device: torch.device) -> tuple[nn.Module, _Active] | None:
    """The stacked model, or None (with the reason logged once) when this architecture cannot be stacked."""
    active = _Active(len(models))
    try:
        net = _build(models, active).to(device)
        _check(net, models, device)
    except _Unstackable as e:
        _note_fallback(type(models[0]).__name__, str(e))
        return None
    return net, active


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off while the stack is checked: on CUDA, cuDNN's TF32 convolutions differ between a grouped and a
    plain conv by more than the check's tolerance (resnet18 on an H200: 5e-4 with TF32, 6e-7 without), which
    says nothing about whether the forward mixes runs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _check(net: nn.Module, models: list[nn.Module], device: torch.device) -> None:
    """The stack must compute what each run's model computes (eval mode: no state changes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_of(models[0]).shape, generator=g).to(device)
    net.eval()
    with torch.no_grad(), _exact_fp32():
        out = _stacked_forward(net, x.unsqueeze(0).expand(len(models), *x.shape))
        for k, m in enumerate(models):
            was = m.training
            m.eval()
            ref = m.to(device)(x)
            m.train(was)
            if out.shape[1:] != ref.shape or not torch.allclose(out[k], ref, rtol=1e-3, atol=1e-4):
                raise _Unstackable("its forward mixes runs (the stacked output differs from the run's own)")


_FALLBACK_NOTED: set[str] = set()


def _note_fallback(arch: str, why: str) -> None:
    if arch not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(arch)
        log.warning("stacked engine: %s cannot be stacked (%s); its runs train one after another", arch, why)


class _StackedOptimizer:
    """Adam, AdamW, SGD, RMSprop and Adagrad (torch's update rules and defaults, no amsgrad, no nesterov, no
    centring) with per-run lr, weight decay, momentum and schedule, and per-run step counts, so a run that sits
    out a tick keeps its state untouched."""

    def __init__(self, params: list[nn.Parameter], cfgs: list[TrainConfig], family: str):
        self.params, self.family = params, family
        dev = params[0].device
        self.k = len(cfgs)
        self.lr = torch.tensor([c.lr for c in cfgs], dtype=torch.float64)
        self.wd = torch.tensor([c.weight_decay for c in cfgs], dtype=torch.float64, device=dev)
        self.mom = torch.tensor([c.momentum for c in cfgs], dtype=torch.float64, device=dev)
        self.step_count = torch.zeros(self.k, dtype=torch.float64)
        self.adam = family in ("adam", "adamw")
        self.state = [{"a": torch.zeros_like(p), "b": torch.zeros_like(p) if self.adam else None}
                      for p in params]
        (self.beta1, self.beta2), self.eps = ADAM_BETAS, ADAM_EPS
        self.alpha, self.adagrad_eps = RMS_ALPHA, ADAGRAD_EPS

    @staticmethod
    def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, idx: torch.Tensor | None, lr_scale: torch.Tensor | None = None) -> None:
        sel = idx if idx is not None else torch.arange(self.k)
        self.step_count[sel] += 1
        lr = self.lr[sel] * (lr_scale[sel] if lr_scale is not None else 1.0)
        steps = self.step_count[sel]
        if self.adam:
            bc1 = 1 - self.beta1 ** steps
            bc2_sqrt = (1 - self.beta2 ** steps).sqrt()
        dev_sel = sel.to(self.params[0].device)
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            full = idx is None
            w = p.data if full else p.data.index_select(0, dev_sel)
            g = p.grad if full else p.grad.index_select(0, dev_sel)
            a = st["a"] if full else st["a"].index_select(0, dev_sel)
            wd = self.wd if full else self.wd[dev_sel]
            if self.family == "adamw":  # decoupled decay, as torch's AdamW: before the update, not in the gradient
                w.mul_(1 - self._col(lr.to(wd.device) * wd, w))
            else:
                g = g + self._col(wd, g) * w
            if self.adam:
                b = st["b"] if full else st["b"].index_select(0, dev_sel)
                a.lerp_(g, 1 - self.beta1)
                b.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (b.sqrt() / self._col(bc2_sqrt, b)).add_(self.eps)
                w.sub_((a / denom).mul_(self._col(lr / bc1, w)))
            elif self.family == "rmsprop":  # a: the running mean of g²
                a.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
                w.sub_((g / a.sqrt().add_(self.eps)).mul_(self._col(lr, w)))
            elif self.family == "adagrad":  # a: the sum of g²
                a.addcmul_(g, g)
                w.sub_((g / a.sqrt().add_(self.adagrad_eps)).mul_(self._col(lr, w)))
            else:
                mom = self.mom if full else self.mom[dev_sel]
                first = self._col((steps == 1).to(torch.float64), g)
                a.copy_(first * g + (1 - first) * (self._col(mom, a) * a + g))
                w.sub_(self._col(lr, w) * a)
            if not full:
                p.data.index_copy_(0, dev_sel, w)
                st["a"].index_copy_(0, dev_sel, a)
                if self.adam:
                    st["b"].index_copy_(0, dev_sel, b)


def _run_batches(run: StackRun, device: torch.device, spec: InputSpec) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's batches over all its epochs, drawn exactly as `train_classifier` draws them."""
    data = run.data.to(device)
    for epoch in range(run.cfg.epochs):
        gen = epoch_generator(run.cfg.seed, epoch, device)
        for b in iterate_batches(data, run.cfg.batch_size, gen):
            yield recipe_input(b.x, gen, run.cfg, spec), b.y


def _stacked_masks(net: nn.Module, runs: list[StackRun], device: torch.device) -> dict[str, torch.Tensor]:
    """name → bool (K, …) for every parameter some run masks; True (kept) for runs without that mask."""
    names = sorted({n for r in runs if r.mask is not None for n in r.mask.masks})
    params = dict(net.named_parameters())
    out = {}
    for n in names:
        p = params[n]
        out[n] = torch.stack([(r.mask.masks[n].to(device) if r.mask is not None and n in r.mask.masks
                               else torch.ones(p.shape[1:], dtype=torch.bool, device=device)) for r in runs])
    return out


def _unstack(net: nn.Module, run: StackRun, k: int) -> nn.Module:
    """Run k's trained weights, back in a model of its own architecture."""
    sd = net.state_dict()
    m = copy.deepcopy(run.model)
    own = m.state_dict()
    m.load_state_dict({n: sd[n][k].reshape(own[n].shape).to(own[n].device).contiguous() for n in own})
    return m


def can_stack(runs: list[StackRun]) -> str | None:
    """Why these runs cannot share one stack (None: they can)."""
    first = runs[0]
    for r in runs[1:]:
        if r.cfg.optimizer != first.cfg.optimizer:
            return "runs of one stack share an optimizer family"
        if r.head_only != first.head_only:
            return "runs of one stack all train everything or all train only the head"
        if (r.cfg.channels_last, r.cfg.amp, r.cfg.cpu_bf16) != (first.cfg.channels_last, first.cfg.amp,
                                                                 first.cfg.cpu_bf16):
            return "runs of one stack share a memory layout and a precision"
    return None


@dataclass
class _Stack:
    """A built stack ready to train: the stacked net, its run selector, masks, trainable weights, optimizer."""

    net: nn.Module
    active: _Active
    masks: dict[str, torch.Tensor]
    named: dict[str, nn.Parameter]
    trainable: list[nn.Parameter]
    opt: _StackedOptimizer


def _ready(runs: list[StackRun], dev: torch.device) -> _Stack | None:
    """Build the stack (None: the architecture cannot be stacked), set what trains and its modes, zero the
    masked weights."""
    built = build_stack([r.model for r in runs], dev)
    if built is None:
        return None
    net, active = built
    for p in net.parameters():
        p.requires_grad_(True)
    if runs[0].head_only:
        for p in net.encoder.parameters():
            p.requires_grad_(False)
        net.eval()
        net.head.train()
    else:
        net.train()
    masks = _stacked_masks(net, runs, dev)
    named = dict(net.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            named[n].mul_(m)
    trainable = [p for p in net.parameters() if p.requires_grad]
    return _Stack(net, active, masks, named, trainable,
                  _StackedOptimizer(trainable, [r.cfg for r in runs], runs[0].cfg.optimizer))


def _tick(st: _Stack, runs: list[StackRun], ids: list[int], batches: list, totals: list[int],
          dev: torch.device) -> None:
    """One step of the runs `ids` on their next batches (the others' weights and optimizer state untouched)."""
    k = len(runs)
    st.active.idx = None if len(ids) == k else torch.tensor(ids, device=dev)
    xs = torch.stack([b[0] for b in batches])
    ys = torch.stack([b[1] for b in batches])
    cfg0 = runs[0].cfg
    with autocast(dev, cfg0.amp, cfg0.cpu_bf16):
        logits = _stacked_forward(st.net, xs, cfg0.channels_last)
    losses = F.cross_entropy(logits.float().transpose(1, 2), ys, reduction="none").mean(1)
    if not torch.isfinite(losses).all():
        raise EdgeguardError("a fine-tuning run's loss became non-finite; lower the learning rate")
    for p in st.trainable:
        p.grad = None
    losses.sum().backward()
    for n, m in st.masks.items():
        g = st.named[n].grad
        if g is not None:
            g.mul_(m)
    lr_scale = None
    if any(r.cfg.scheduler != "none" for r in runs):
        lr_scale = torch.tensor([lr_factor(r.cfg.scheduler, int(st.opt.step_count[i]), totals[i])
                                 for i, r in enumerate(runs)], dtype=torch.float64)
    st.opt.step(None if st.active.idx is None else st.active.idx.cpu(), lr_scale)
    with torch.no_grad():
        for n, m in st.masks.items():
            st.named[n].mul_(m)
    st.active.idx = None


def train_stack(runs: list[StackRun], device: str | torch.device = "auto",
                on_done: Callable[[int, nn.Module], None] | None = None,
                progress: Callable[[int], None] | None = None) -> list[nn.Module] | None:
    """Train `runs` together; returns each run's trained model (its start is never modified), or None when the
    architecture cannot be stacked (the caller then trains the runs one by one).

    `on_done(i, model)` is called as soon as run i has finished (small runs finish first), so the caller can
    log it before the stack ends; `progress(steps)` after each tick with the number of run-steps it trained.
    Each tick trains the runs whose next batch has the size the most runs are waiting on.
    """
    if not runs:
        return []
    why = can_stack(runs)
    if why:
        raise EdgeguardError(why)
    dev = resolve_device(device)
    for r in runs:
        r.cfg.validate()
        if len(r.data) == 0:
            raise EdgeguardError("the training set is empty")
    st = _ready(runs, dev)
    if st is None:
        return None
    k = len(runs)
    sizes = [r.batch_sizes() for r in runs]
    pos = [0] * k
    streams = [_run_batches(r, dev, input_of(r.model)) for r in runs]
    totals = [max(1, len(s)) for s in sizes]
    results: list[nn.Module | None] = [None] * k
    pending_done = [i for i in range(k) if not sizes[i]]
    while True:
        for i in pending_done:
            results[i] = _unstack(st.net, runs[i], i)
            if on_done:
                on_done(i, results[i])
        pending_done = []
        waiting = [(sizes[i][pos[i]], i) for i in range(k) if pos[i] < len(sizes[i])]
        if not waiting:
            break
        counts = Counter(s for s, _ in waiting)
        size = max(counts, key=lambda s: (counts[s], s))
        ids = [i for s, i in waiting if s == size]
        _tick(st, runs, ids, [next(streams[i]) for i in ids], totals, dev)
        for i in ids:
            pos[i] += 1
            if pos[i] == len(sizes[i]):
                pending_done.append(i)
        if progress:
            progress(len(ids))
    return results
