"""Hardening (`edgeguard harden`): make fine-tuning on the target a bad start under a *distribution* of attacks.

First-order meta-learning in the SOPHON / TAR family. Each outer step:
1. samples `attacks` fine-tuning attacks (optimizer SGD-momentum / Adam / AdamW, lr log-uniform per optimizer
   over the robust suite's range, batch size, the attacker's subset size log-uniform from `min_images` (few-
   shot attackers gain most from a transferred start, and the log-ratio axis weighs them most), head kept or
   re-initialised, pruned weights masked / free / regrowing, BN statistics kept or re-estimated);
2. runs each for `inner_steps` plain steps from the current weights on the defender's target data (a copy;
   BN in train mode as an attacker runs it) and, every `suppress_every` steps and at the end, takes the
   gradient of a bounded suppression loss (KL of uniform to the prediction: 0 at chance) on a held-out
   target batch; their mean, late steps weighted more (an attacker reads the last epoch), is the
   meta-gradient (first order: d θ_t / d θ_0 ≈ I), head gradients only where the attack kept the head;
   each attack's gradient is scaled to unit norm (a kept head's is 10-30× a re-initialised one's and would
   decide alone), their mean clipped to `meta_clip`;
3. adds the source terms on a source batch (CE + temperature-2 distillation to the frozen input model);
4. one Adam step; pruned weights stay exactly 0 (the mask is the input's).
Every `eval_every` outer steps a proxy of the robust SLC-AUC is measured: a few-shot attack longer than any
the sampler draws (`proxy_steps` of Adam 1e-3 on 64 of the defender's target images, pruned weights free),
scored on held-out target images, and the source accuracy on held-out source images with statistics
re-estimated on source data. The shipped checkpoint is the best proxy above the source floor; a step that
falls below the floor rolls back to the best checkpoint and halves the suppression weight.
The shipped BatchNorm statistics are re-estimated on the defender's source data. Measurements behind the
choices: benchmarks/RESULTS.md ("Hardening").
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import param
from ..devices import autocast, cpu_bf16
from ..errors import EdgeguardError
from ..masks import MaskSet, prunable_names
from ..progress import progress
from ..training import TensorData, augment, evaluate, normalize, reestimate_bn
from .base import Checkpoints, DataNeeds, MethodResult, ProtectionData, register_method

TARGET_SEED_OFFSET = 1  # as NTP: the target fraction is drawn with seed + 1
LR_RANGES = {"sgd": (1e-3, 1e-1), "adam": (1e-5, 3e-3), "adamw": (1e-5, 3e-3)}  # the robust suite's span
BATCHES = (16, 32, 64, 128)
PROXY_IMAGES = 64


@dataclass
class HardenConfig:
    outer_steps: int = param(300, "outer (meta) steps")
    attacks: int = param(2, "simulated attacks sampled per outer step")
    inner_steps: int = param(32, "plain fine-tuning steps of each simulated attack")
    suppress_every: int = param(8, "take the suppression gradient every this many inner steps (and at the end)")
    min_images: int = param(8, "smallest attacker subset a simulated attack trains on (log-uniform up to all)")
    suppress_weight: float = param(100.0, "weight of the meta-gradient against the source terms (Adam normalises "
                                          "the sum: at 1 the source terms decide, RESULTS)")
    meta_clip: float = param(0.5, "clip of the meta-gradient's global norm")
    lr: float = param(1e-3, "Adam learning rate of the outer step")
    kd_weight: float = param(1.0, "weight of the distillation to the frozen input model on source batches")
    batch_size: int = param(128, "source batch of the outer step and held-out target batch of the suppression")
    augment_shift: int = param(2, "random translation (pixels) of the source batches")
    p_head_reinit: float = param(0.5, "probability that a simulated attack re-initialises the head")
    p_free: float = param(0.35, "probability that pruned weights train freely (regrow: the same; rest: masked)")
    p_bn_reestimate: float = param(0.25, "probability that an attack re-estimates BN statistics first")
    source_fraction: float = param(0.1, "fraction of the source training set the defender uses")
    target_fraction: float = param(0.1, "fraction of the (labelled) target training set the defender uses")
    holdout: float = param(0.2, "share of each defender set held out for the proxy and the source floor")
    source_floor: float = param(0.008, "roll back when held-out source accuracy falls this far below the input "
                                       "file's (eval mode, as shipped)")
    eval_every: int = param(25, "outer steps between proxy measurements, checkpoints and rollbacks")
    proxy_steps: int = param(96, "length of the held-out proxy attack (64 images, batch 32, Adam 1e-3, free)")
    precision: str = param("auto", "simulated attacks in bf16 (auto: where the CPU has native bf16, and CUDA)",
                           choices=("auto", "fp32", "bf16"))
    seed: int = param(0, "seed of the data fractions, sampled attacks and batches")

    def validate(self) -> None:
        if min(self.outer_steps, self.attacks, self.inner_steps, self.suppress_every, self.batch_size,
               self.eval_every, self.proxy_steps, self.min_images) < 1:
            raise EdgeguardError("outer_steps, attacks, inner_steps, suppress_every, batch_size, eval_every, "
                                 "proxy_steps and min_images must be at least 1")
        for name in ("p_head_reinit", "p_free", "p_bn_reestimate"):
            if not 0 <= getattr(self, name) <= 1:
                raise EdgeguardError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if 2 * self.p_free > 1:
            raise EdgeguardError(f"p_free is drawn for free and for regrow: it must be ≤ 0.5, got {self.p_free}")
        if not 0 < self.source_fraction <= 1 or not 0 < self.target_fraction <= 1:
            raise EdgeguardError("source and target fractions must be in (0, 1]")
        if not 0 < self.holdout < 1:
            raise EdgeguardError(f"holdout must be in (0, 1), got {self.holdout}")
        for name in ("suppress_weight", "meta_clip", "lr", "kd_weight", "source_floor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name in ("lr", "meta_clip") and v == 0):
                raise EdgeguardError(f"{name} must be a {'positive' if name in ('lr', 'meta_clip') else '≥ 0'} "
                                     f"number, got {v}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EdgeguardError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.augment_shift < 0:
            raise EdgeguardError("augment_shift must be ≥ 0")


def harden_needs(cfg: HardenConfig) -> DataNeeds:
    return DataNeeds(source_images=True, source_labels=True, target_images=True, target_labels=True)


@dataclass(frozen=True)
class SimAttack:
    """One sampled attack of the distribution."""

    optimizer: str
    lr: float
    batch_size: int
    head_reinit: bool
    pruned: str  # masked | free | regrow
    bn_reestimate: bool
    images: int = 0  # the attacker's subset size (0: all of the defender's target split)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=5e-4)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-2)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=8e-4)


def sample_attack(rng: np.random.Generator, cfg: HardenConfig, available: int = 0) -> SimAttack:
    opt = str(rng.choice(sorted(LR_RANGES)))
    lo, hi = LR_RANGES[opt]
    u = rng.random()
    pruned = "free" if u < cfg.p_free else "regrow" if u < 2 * cfg.p_free else "masked"
    lr = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    batch, head = int(rng.choice(BATCHES)), bool(rng.random() < cfg.p_head_reinit)
    bn = bool(rng.random() < cfg.p_bn_reestimate)
    images = 0
    if available > cfg.min_images:  # few-shot attackers are where transfer pays most (the log-ratio axis)
        images = int(round(math.exp(rng.uniform(math.log(cfg.min_images), math.log(available)))))
    return SimAttack(opt, lr, batch, head, pruned, bn, images)


def suppression_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform ‖ softmax): 0 when the prediction is at chance; the gradient pulls the classes together."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -logp.mean() - math.log(logits.shape[1])


def _split(d: TensorData, frac: float, holdout: float, seed: int) -> tuple[TensorData, TensorData]:
    """The defender's fraction of `d`, split into (train, held out), both seeded."""
    n = max(2, int(round(frac * len(d))))
    idx = np.random.default_rng(seed).permutation(len(d))[:n]
    n_hold = max(1, int(round(holdout * n)))
    return d.take(np.sort(idx[n_hold:])), d.take(np.sort(idx[:n_hold]))


def _batch(d: TensorData, size: int, gen: torch.Generator) -> TensorData:
    idx = torch.randint(0, len(d), (min(size, len(d)),), generator=gen).to(d.x.device)
    return TensorData(d.x[idx], d.y[idx])


def _normalized(d: TensorData) -> TensorData:
    """Float channels-last inputs once, so the many inner steps skip the conversion (channels-last: RESULTS)."""
    return TensorData(normalize(d.x).contiguous(memory_format=torch.channels_last), d.y)


def _start(model: nn.Module, mask: MaskSet | None, atk: SimAttack, gen: torch.Generator,
           bn_data: TensorData | None) -> tuple[nn.Module, MaskSet | None]:
    """The attacker's copy: head re-initialised, pruned weights regrown, statistics re-estimated as sampled."""
    from ..finetune.moves import regrow_, reinit_head  # the evaluation's own moves: one definition

    m = copy.deepcopy(model)
    if atk.head_reinit:
        reinit_head(m, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    keep = None
    if mask is not None and atk.pruned == "masked":
        keep = mask
    elif mask is not None and atk.pruned == "regrow":
        regrow_(m, mask, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    if atk.bn_reestimate and bn_data is not None:
        reestimate_bn(m, bn_data)
    return m, keep


def simulate(model: nn.Module, mask: MaskSet | None, atk: SimAttack, adapt: TensorData, held: TensorData,
             cfg: HardenConfig, gen: torch.Generator, bn_data: TensorData
             ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Run one sampled attack on a copy (`adapt`, `held`: normalised float inputs, `bn_data`: raw images);
    return the first-order meta-gradient (by parameter name), the mean suppression loss along the trajectory
    and the held-out accuracy at its end."""
    if 0 < atk.images < len(adapt):  # the attacker's own few images, reused every step as a real attack does
        pick = torch.randperm(len(adapt), generator=gen)[: atk.images].to(adapt.x.device)
        adapt, bn_data = TensorData(adapt.x[pick], adapt.y[pick]), TensorData(bn_data.x[pick], bn_data.y[pick])
    m, keep = _start(model, mask, atk, gen, _batch(bn_data, atk.batch_size, gen))
    m = m.to(memory_format=torch.channels_last).train()
    dev = adapt.x.device
    low = cpu_bf16(cfg.precision, dev)
    params = dict(m.named_parameters())
    opt = atk.make_optimizer(list(params.values()))
    names = [n for n in params if not (atk.head_reinit and n.startswith("head."))]
    meta = {n: torch.zeros_like(params[n]) for n in names}
    losses, total_w = [], 0.0
    acc = 0.0
    for t in range(cfg.inner_steps + 1):
        if t % cfg.suppress_every == 0 or t == cfg.inner_steps:
            w = (t + cfg.suppress_every) / (cfg.inner_steps + cfg.suppress_every)  # late steps count more (TAR)
            h = _batch(held, cfg.batch_size, gen)
            with autocast(dev, cfg.precision != "fp32", low):
                out = m(h.x)
            loss = suppression_loss(out)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    meta[n] += w * g
            losses.append(float(loss.detach()))
            total_w += w
            if t == cfg.inner_steps:
                acc = float((out.argmax(1) == h.y).float().mean())
                break
        b = _batch(adapt, min(atk.batch_size, len(adapt)), gen)
        opt.zero_grad(set_to_none=True)
        with autocast(dev, cfg.precision != "fp32", low):
            out = m(b.x)
        F.cross_entropy(out.float(), b.y).backward()
        if keep is not None:
            keep.mask_grads_(m)
        opt.step()
        if keep is not None:
            keep.zero_masked_(m)
    return {n: g / total_w for n, g in meta.items()}, float(np.mean(losses)), acc


def proxy_attack(model: nn.Module, adapt: TensorData, held: TensorData, cfg: HardenConfig) -> float:
    """Held-out target accuracy after the proxy attack (longer than any the sampler draws; `adapt` normalised,
    `held` raw images)."""
    gen = torch.Generator().manual_seed(cfg.seed * 31 + 5)
    pick = torch.randperm(len(adapt), generator=gen)[:PROXY_IMAGES].to(adapt.x.device)
    adapt = TensorData(adapt.x[pick], adapt.y[pick])
    m = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
    for p in m.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=8e-4)
    for _ in range(cfg.proxy_steps):
        b = _batch(adapt, 32, gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(b.x).float(), b.y).backward()
        opt.step()
    return evaluate(m, held)


def _shippable(model: nn.Module, src: TensorData) -> nn.Module:
    """A copy with the source's BatchNorm statistics, in eval mode: what the shipped file holds."""
    m = copy.deepcopy(model)
    reestimate_bn(m, src, batch_size=256)
    return m.eval()


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.float() ** 2).sum()) for g in grads.values()))


def _clip_(grads: dict[str, torch.Tensor], max_norm: float) -> float:
    norm = _norm(grads)
    if norm > max_norm:
        for g in grads.values():
            g.mul_(max_norm / (norm + 1e-12))
    return norm


def run_harden(model: nn.Module, data: ProtectionData, cfg: HardenConfig, checkpoints: Checkpoints) -> MethodResult:
    dev = data.device
    model = model.to(dev)
    mask = data.mask.to(dev) if data.mask is not None else None
    if mask is not None:
        mask.zero_masked_(model)
    src, src_held = _split(data.source, cfg.source_fraction, cfg.holdout, cfg.seed)
    tgt, tgt_held = _split(data.target, cfg.target_fraction, cfg.holdout, cfg.seed + TARGET_SEED_OFFSET)
    tgt_n, tgt_held_n = _normalized(tgt), _normalized(tgt_held)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    floor = evaluate(model, src_held) - cfg.source_floor  # the input file as shipped, eval mode

    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    st = checkpoints.load("harden", dev)
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        best = {"state": st["best_state"], "opt": st["best_opt"], "step": int(st["best_step"]),
                "proxy": float(st["best_proxy"])}
        start, weight, history = int(st["step"]), float(st["weight"]), json.loads(st["history"])
    else:  # the input is the first candidate to ship
        start, weight = 0, cfg.suppress_weight
        shipped = _shippable(model, src)
        best = {"state": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "step": 0,
                "proxy": proxy_attack(shipped, tgt_n, tgt_held, cfg)}
        history = [{"step": 0, "source": evaluate(shipped, src_held), "input_source": floor + cfg.source_floor,
                    "proxy": best["proxy"], "weight": weight}]

    bar = progress(range(start, cfg.outer_steps), desc="harden", total=cfg.outer_steps - start)
    window: list[tuple[float, float]] = []
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        meta: dict[str, torch.Tensor] = {}
        for _ in range(cfg.attacks):
            g, loss, acc = simulate(model, mask, sample_attack(rng, cfg, len(tgt_n)), tgt_n, tgt_held_n, cfg, gen, tgt)
            scale = 1.0 / (cfg.attacks * max(_norm(g), 1e-12))  # unit norm each: a kept head's large gradient
            for n, v in g.items():                               # must not drown the re-initialised heads'
                meta[n] = meta[n] + v * scale if n in meta else v * scale
            window.append((loss, acc))
        _clip_(meta, cfg.meta_clip)

        model.train()
        s = _batch(src, cfg.batch_size, gen)
        xs = augment(normalize(s.x), gen, cfg.augment_shift)
        out = model(xs).float()
        with torch.no_grad():
            soft = F.softmax(teacher(xs).float() / 2.0, dim=1)
        kd = F.kl_div(F.log_softmax(out / 2.0, dim=1), soft, reduction="batchmean") * 4.0
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(out, s.y) + cfg.kd_weight * kd).backward()
        params = dict(model.named_parameters())
        for n, g in meta.items():
            params[n].grad = g * weight if params[n].grad is None else params[n].grad + g * weight
        if mask is not None:
            mask.mask_grads_(model)
        opt.step()
        if mask is not None:
            mask.zero_masked_(model)

        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.outer_steps:
            shipped = _shippable(model, src)
            src_acc = evaluate(shipped, src_held)
            proxy = proxy_attack(shipped, tgt_n, tgt_held, cfg)
            row = {"step": step + 1, "source": src_acc, "proxy": proxy, "weight": weight,
                   "sim_loss": float(np.mean([w[0] for w in window])),
                   "sim_acc": float(np.mean([w[1] for w in window]))}
            window = []
            if src_acc < floor:  # below the floor: back to the best checkpoint, half the suppression
                model.load_state_dict(best["state"])
                opt.load_state_dict(copy.deepcopy(best["opt"]))
                weight /= 2
                row["rolled_back_to"] = best["step"]
            elif proxy <= best["proxy"]:
                best = {"state": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                        "step": step + 1, "proxy": proxy}
            history.append(row)
            bar.set_postfix(source=f"{src_acc * 100:.1f}%", proxy=f"{proxy * 100:.1f}%",
                            sim=f"{row['sim_acc'] * 100:.1f}%", loss=f"{row['sim_loss']:.3f}")
            checkpoints.save("harden", _payload(model, opt, best, step + 1, weight, history))

    model.load_state_dict(best["state"])
    reestimate_bn(model, src, batch_size=256)
    model.eval()
    out_mask = mask.cpu() if mask is not None else MaskSet.ones(model.cpu(), prunable_names(model, "encoder"))
    return MethodResult(model, out_mask, history,
                        notes={"shipped_step": best["step"], "proxy_accuracy": best["proxy"],
                               "source_floor": floor})


def _payload(model: nn.Module, opt: torch.optim.Optimizer, best: dict, step: int, weight: float,
             history: list[dict]) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "weight": weight,
            "best_state": best["state"], "best_opt": best["opt"], "best_step": best["step"],
            "best_proxy": best["proxy"], "history": json.dumps(history)}


METHOD = register_method(
    "harden", "meta-learned hardening: fine-tuning on the target a bad start under a distribution of attacks "
              "(on a source model or on NTP's / MAP's output; the mask stays exact)",
    HardenConfig, harden_needs, run_harden, refines=True)
