"""Hardening (`edgeguard harden`): make fine-tuning on the target a bad start under a *distribution* of attacks.

Meta-learning in the SOPHON / TAR family. Each outer step:
1. samples `attacks` fine-tuning attacks from the attack space the suites are drawn from
   (`finetune.ATTACK_SPACE`: every optimizer family a buyer might use (SGD-momentum, Adam, AdamW, RMSprop,
   Adagrad), lr log-uniform over that optimizer's range and its weight decay, batch size), the attacker's
   subset size log-uniform from one image per class (few-shot attackers gain most from a transferred start,
   and the log-ratio axis weighs them most), head kept or re-initialised (a new head is the attacker's own:
   its mask dropped, as in the scored attack), pruned weights masked / free / regrowing, BN statistics kept
   or re-estimated on the attacker's subset;
2. runs each for `inner_steps` steps, BN in train mode as an attacker runs it, and every `suppress_every`
   steps and at the end scores a bounded suppression loss (KL of uniform to the prediction: 0 at chance) on a
   held-out target batch, late steps weighted more (an attacker reads the last epoch). Attacks on at most
   `exact_images` images (where the AUC is decided) are unrolled differentiably (`finetune.unrolled`: full
   batches as the evaluation runs them, the head re-initialisation and regrowth inside the graph) and the
   meta-gradient is exact (d θ_T / d θ_0 taken; the adaptive optimizers' √v normaliser held constant in the
   backward pass); larger ones run through the evaluation's own fine-tuning loop with the first-order
   meta-gradient (d θ_T / d θ_0 ≈ I). Head gradients only where the attack kept the head; each attack's
   gradient scaled to unit norm (a kept head's is 10-30× a re-initialised one's and would decide alone), their
   mean clipped to `meta_clip`;
3. adds the source terms on a source batch (CE + distillation at `kd_temperature` to the frozen input model);
4. one Adam step; pruned weights stay exactly 0 (the mask is the input's).
Every `eval_every` outer steps a proxy of the robust SLC-AUC is measured: a few-shot attack longer than any
the sampler draws (`proxy_steps` of Adam at `proxy_lr` on `proxy_images` of the defender's target images,
pruned weights free), scored on held-out target images, and the source accuracy on held-out source images
with statistics re-estimated on source data. The shipped checkpoint is the best proxy above the source floor;
a step that falls below the floor rolls back to the best checkpoint and halves the suppression weight.
The shipped BatchNorm statistics are re-estimated on the defender's source data. Measurements behind the
choices: benchmarks/RESULTS.md ("Hardening", "Hardening v2").
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..bn_stats import reestimate_bn
from ..config import param
from ..devices import autocast, cpu_bf16
from ..errors import EdgeguardError
from ..finetune import ATTACK_SPACE, AttackRecipe, StackRun, attack_start, bn_move, train_run
from ..finetune.unrolled import unrolled_run
from ..masks import MaskSet, prunable_names
from ..models.registry import input_of
from ..progress import progress
from ..training import TensorData, TrainConfig, augment, distillation_loss, evaluate, normalize, recipe_input
from .base import Checkpoints, DataNeeds, MethodResult, ProtectionData, register_method

TARGET_SEED_OFFSET = 1  # as NTP: the target fraction is drawn with seed + 1


@dataclass
class HardenConfig:
    outer_steps: int = param(300, "outer (meta) steps")
    attacks: int = param(2, "simulated attacks sampled per outer step")
    inner_steps: int = param(32, "plain fine-tuning steps of each simulated attack")
    suppress_every: int = param(8, "take the suppression gradient every this many inner steps (and at the end)")
    min_images: int = param(0, "smallest attacker subset a simulated attack trains on, log-uniform up to all "
                               "(0: one image per class)")
    exact_images: int = param(64, "attacks on at most this many images differentiate through the whole unrolled "
                                   "attack (exact meta-gradient, fp32); larger ones take the first-order one "
                                   "(0: all first order)")
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
    proxy_steps: int = param(96, "length of the held-out proxy attack (pruned weights free)")
    proxy_images: int = param(64, "target images the proxy attacker trains on")
    proxy_batch: int = param(32, "batch size of the proxy attack")
    proxy_lr: float = param(1e-3, "Adam learning rate of the proxy attack")
    kd_temperature: float = param(2.0, "temperature of the distillation to the frozen input model")
    precision: str = param("auto", "simulated attacks in bf16 (auto: where the CPU has native bf16, and CUDA)",
                           choices=("auto", "fp32", "bf16"))
    seed: int = param(0, "seed of the data fractions, sampled attacks and batches")

    def validate(self) -> None:
        if min(self.outer_steps, self.attacks, self.inner_steps, self.suppress_every, self.batch_size,
               self.eval_every, self.proxy_steps, self.proxy_images, self.proxy_batch) < 1:
            raise EdgeguardError("outer_steps, attacks, inner_steps, suppress_every, batch_size, eval_every, "
                                 "proxy_steps, proxy_images and proxy_batch must be at least 1")
        if self.min_images < 0 or self.exact_images < 0:
            raise EdgeguardError("min_images and exact_images must be ≥ 0")
        for name in ("p_head_reinit", "p_free", "p_bn_reestimate"):
            if not 0 <= getattr(self, name) <= 1:
                raise EdgeguardError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if 2 * self.p_free > 1:
            raise EdgeguardError(f"p_free is drawn for free and for regrow: it must be ≤ 0.5, got {self.p_free}")
        if not 0 < self.source_fraction <= 1 or not 0 < self.target_fraction <= 1:
            raise EdgeguardError("source and target fractions must be in (0, 1]")
        if not 0 < self.holdout < 1:
            raise EdgeguardError(f"holdout must be in (0, 1), got {self.holdout}")
        positive = ("lr", "meta_clip", "proxy_lr", "kd_temperature")
        for name in ("suppress_weight", "meta_clip", "lr", "kd_weight", "source_floor", "proxy_lr", "kd_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name in positive and v == 0):
                raise EdgeguardError(f"{name} must be a {'positive' if name in positive else '≥ 0'} number, got {v}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EdgeguardError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.augment_shift < 0:
            raise EdgeguardError("augment_shift must be ≥ 0")


def harden_needs(cfg: HardenConfig) -> DataNeeds:
    return DataNeeds(source_images=True, source_labels=True, target_images=True, target_labels=True)


def sample_attack(rng: np.random.Generator, cfg: HardenConfig, available: int = 0, classes: int = 10
                  ) -> tuple[AttackRecipe, int]:
    """A simulated attack from the attack space the suites draw from, and the attacker's subset size (0: all of
    the defender's target split), log-uniform from `min_images` (one per class by default): few-shot attackers
    are where transfer pays most (the log-ratio axis)."""
    recipe = ATTACK_SPACE.simulated_draw(rng, cfg.p_head_reinit, cfg.p_free, cfg.p_bn_reestimate)
    images, lo = 0, cfg.min_images or classes
    if available > lo:
        images = int(round(math.exp(rng.uniform(math.log(lo), math.log(available)))))
    return recipe, images


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


def _draws(d: TensorData, size: int, steps: int, gen: torch.Generator):
    """`batches` for a run of `steps` batches drawn with replacement by `gen` (the attacker reuses its few
    images every step)."""
    def batches(epoch: int, _epoch_gen: torch.Generator):
        for _ in range(steps):
            yield _batch(d, size, gen)

    return batches


def _sim_config(atk: AttackRecipe, seed: int, cfg: HardenConfig, dev: torch.device) -> TrainConfig:
    """One simulated attack as a training config: the recipe's optimizer for `inner_steps` steps (no schedule:
    a few steps of a long run sit before its decay), in bf16 where the hardening runs it."""
    return replace(atk.train_config(seed, str(dev), cpu_bf16(cfg.precision, dev)), epochs=1, scheduler="none",
                   amp=cfg.precision != "fp32")


def simulate(model: nn.Module, mask: MaskSet | None, atk: AttackRecipe, images: int, adapt: TensorData,
             held: TensorData, cfg: HardenConfig, gen: torch.Generator
             ) -> tuple[dict[str, torch.Tensor], float, float] | None:
    """Run one sampled attack on a copy through the attacker's own moves and fine-tuning run; return the
    first-order meta-gradient (by parameter name; a re-initialised head's is left out), the mean suppression
    loss along the trajectory and the held-out accuracy at its end. None when the attack diverged."""
    dev = adapt.x.device
    if 0 < images < len(adapt):  # the attacker's own few images, reused every step as a real attack does
        adapt = adapt.take(torch.randperm(len(adapt), generator=gen)[:images].to(dev))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    m, keep = attack_start(model, mask, atk, seed, dev)
    bn_move(m, atk, adapt)
    params = dict(m.named_parameters())
    names = [n for n in params if not (atk.head == "reinit" and n.startswith("head."))]
    meta = {n: torch.zeros_like(params[n]) for n in names}
    losses, weights, accs = [], [], []
    tc = _sim_config(atk, seed, cfg, dev)

    def observe(t: int) -> None:  # the suppression gradient every `suppress_every` steps and at the end
        if t % cfg.suppress_every and t != cfg.inner_steps:
            return
        w = (t + cfg.suppress_every) / (cfg.inner_steps + cfg.suppress_every)  # late steps count more (TAR)
        h = _batch(held, cfg.batch_size, gen)
        with autocast(dev, tc.amp, tc.cpu_bf16):
            out = m(normalize(h.x, input_of(m)).contiguous(memory_format=torch.channels_last))
        loss = suppression_loss(out)
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
            if g is not None:
                meta[n] += w * g
        losses.append(float(loss.detach()))
        weights.append(w)
        accs.append(float((out.argmax(1) == h.y).float().mean()))

    try:
        train_run(StackRun(m, adapt, tc, keep), "", batches=_draws(adapt, atk.batch_size, cfg.inner_steps, gen),
                  steps_per_epoch=cfg.inner_steps, observe=observe)
    except EdgeguardError:  # the sampled lr diverged on this start: no information, skip it
        return None
    return {n: g / sum(weights) for n, g in meta.items()}, float(np.mean(losses)), accs[-1]


def _exact_start(model: nn.Module, attacker: nn.Module, mask: MaskSet | None, atk: AttackRecipe
                 ) -> dict[str, torch.Tensor]:
    """The attack's starting weights as functions of the defender's live ones: a re-initialised head is the
    attacker's own (a constant), regrown pruned weights are the attacker's noise where the mask is off."""
    live, out = dict(model.named_parameters()), {}
    for n, p in attacker.named_parameters():
        if atk.head == "reinit" and n.startswith("head."):
            out[n] = p.detach().requires_grad_(True)  # trained by the attack, no path to the defender
        elif atk.pruned == "regrow" and mask is not None and n in mask.masks:
            out[n] = torch.where(mask.masks[n], live[n], p.detach())
        else:
            out[n] = live[n]
    return out


def simulate_exact(model: nn.Module, mask: MaskSet | None, atk: AttackRecipe, adapt: TensorData, held: TensorData,
                   cfg: HardenConfig, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], float, float] | None:
    """`simulate` for a few-shot attack, differentiated through all of its unrolled steps (fp32): full batches of
    the attacker's images where they fit its batch size (as the evaluation runs them), else drawn batches;
    the same weighted suppression losses, their gradient exact (d θ_T / d θ_0 taken, not assumed I)."""
    dev, spec = adapt.x.device, input_of(model)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    m, keep = attack_start(model, mask, atk, seed, dev)
    bn_move(m, atk, adapt)
    m.train()
    tc = replace(_sim_config(atk, seed, cfg, dev), amp=False)
    full = len(adapt) <= atk.batch_size
    batches = [adapt if full else _batch(adapt, atk.batch_size, gen) for _ in range(cfg.inner_steps)]
    inputs = [(recipe_input(b.x, gen, tc, spec), b.y) for b in batches]
    helds = [_batch(held, cfg.batch_size, gen) for _ in range(cfg.inner_steps // cfg.suppress_every + 2)]
    accs: list[float] = []
    weights: list[float] = []

    def probe(t: int, params: dict, buffers: dict) -> torch.Tensor | None:
        if t == 0 or (t % cfg.suppress_every and t != cfg.inner_steps):
            return None
        h = helds[len(accs)]
        out = functional_call(m, {**params, **{n: b.clone() for n, b in buffers.items()}}, (normalize(h.x, spec),))
        accs.append(float((out.argmax(1) == h.y).float().mean()))
        weights.append((t + cfg.suppress_every) / (cfg.inner_steps + cfg.suppress_every))  # late steps count more
        return weights[-1] * suppression_loss(out)

    start = _exact_start(model, m, mask, atk)
    losses = unrolled_run(m, start, tc, cfg.inner_steps, lambda t: inputs[t],
                          keep.masks if keep is not None else None, probe)
    total = sum(losses) / sum(weights)
    if not torch.isfinite(total):
        return None
    live = dict(model.named_parameters())
    names = [n for n in live if not (atk.head == "reinit" and n.startswith("head."))]
    grads = torch.autograd.grad(total, [live[n] for n in names], allow_unused=True)
    meta = {n: g.detach() if g is not None else torch.zeros_like(live[n]) for n, g in zip(names, grads)}
    if not all(torch.isfinite(g).all() for g in meta.values()):
        return None
    return meta, float(total.detach()), accs[-1]


def proxy_attack(model: nn.Module, adapt: TensorData, held: TensorData, cfg: HardenConfig) -> float:
    """Held-out target accuracy after the proxy attack (longer than any the sampler draws), run as the
    evaluation runs an attack: direct-all/free, Adam."""
    gen = torch.Generator().manual_seed(_proxy_seed(cfg))
    dev = adapt.x.device
    adapt = adapt.take(torch.randperm(len(adapt), generator=gen)[: cfg.proxy_images].to(dev))
    recipe = ATTACK_SPACE.recipe("direct-all/free", "adam", lr=cfg.proxy_lr, batch_size=cfg.proxy_batch)
    m, _ = attack_start(model, None, recipe, 0, dev)
    tc = replace(recipe.train_config(cfg.seed, str(dev)), epochs=1, amp=False)
    train_run(StackRun(m, adapt, tc), "", batches=_draws(adapt, cfg.proxy_batch, cfg.proxy_steps, gen),
              steps_per_epoch=cfg.proxy_steps)
    return evaluate(m, held)


def _proxy_seed(cfg: HardenConfig) -> int:
    return cfg.seed * 31 + 5


def _step_seeds(cfg: HardenConfig, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Outer step `step`'s draws: the attacks it samples (numpy) and its batches and starts (torch), both from
    (seed, step) alone, so a resumed hardening draws what an uninterrupted one would."""
    return np.random.default_rng([cfg.seed, step]), torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


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


@dataclass
class _State:
    """What a hardening carries between outer steps (and saves at each checkpoint)."""

    opt: torch.optim.Optimizer
    best: dict  # state, opt, step, proxy: the checkpoint that ships
    start: int
    weight: float  # the suppression weight (halved at each rollback)
    history: list[dict]


@dataclass
class _Data:
    src: TensorData
    src_held: TensorData
    tgt: TensorData
    tgt_held: TensorData
    floor: float  # held-out source accuracy below which a step rolls back
    classes: int  # the target's class count (the smallest attacker has one image of each)


def _meta_gradient(model: nn.Module, mask: MaskSet | None, d: _Data, cfg: HardenConfig, step: int,
                   window: list[tuple[float, float]]) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """The mean of `attacks` sampled attacks' meta-gradients, each scaled to unit norm (a kept head's large
    gradient must not drown the re-initialised heads'), clipped to `meta_clip`."""
    rng, gen = _step_seeds(cfg, step)
    meta: dict[str, torch.Tensor] = {}
    for _ in range(cfg.attacks):
        atk, images = sample_attack(rng, cfg, len(d.tgt), d.classes)
        if 0 < images <= cfg.exact_images:
            subset = d.tgt.take(torch.randperm(len(d.tgt), generator=gen)[:images].to(d.tgt.x.device))
            sim = simulate_exact(model, mask, atk, subset, d.tgt_held, cfg, gen)
        else:
            sim = simulate(model, mask, atk, images, d.tgt, d.tgt_held, cfg, gen)
        if sim is None:
            continue
        g, loss, acc = sim
        scale = 1.0 / (cfg.attacks * max(_norm(g), 1e-12))
        for n, v in g.items():
            meta[n] = meta[n] + v * scale if n in meta else v * scale
        window.append((loss, acc))
    _clip_(meta, cfg.meta_clip)
    return meta, gen


def _outer_step(model: nn.Module, teacher: nn.Module, mask: MaskSet | None, st: _State, d: _Data,
                meta: dict[str, torch.Tensor], gen: torch.Generator, cfg: HardenConfig) -> None:
    """One Adam step on the source terms (CE + distillation to the input model) plus the weighted meta-gradient;
    pruned weights stay exactly 0."""
    model.train()
    s = _batch(d.src, cfg.batch_size, gen)
    xs = augment(normalize(s.x, input_of(model)), gen, cfg.augment_shift)
    out = model(xs).float()
    t = cfg.kd_temperature
    with torch.no_grad():
        teach = teacher(xs).float()
    kd = distillation_loss(out, teach, t)
    st.opt.zero_grad(set_to_none=True)
    (F.cross_entropy(out, s.y) + cfg.kd_weight * kd).backward()
    params = dict(model.named_parameters())
    for n, g in meta.items():
        params[n].grad = g * st.weight if params[n].grad is None else params[n].grad + g * st.weight
    if mask is not None:
        mask.mask_grads_(model)
    st.opt.step()
    if mask is not None:
        mask.zero_masked_(model)


def _measure(model: nn.Module, st: _State, d: _Data, cfg: HardenConfig, step: int,
             window: list[tuple[float, float]]) -> dict:
    """The proxy and the held-out source accuracy of the file as it would ship; below the floor, back to the best
    checkpoint with half the suppression, else a new best when the proxy did not rise."""
    shipped = _shippable(model, d.src)
    src_acc = evaluate(shipped, d.src_held)
    proxy = proxy_attack(shipped, d.tgt, d.tgt_held, cfg)
    row = {"step": step, "source": src_acc, "proxy": proxy, "weight": st.weight,
           "sim_loss": float(np.mean([w[0] for w in window])) if window else float("nan"),
           "sim_acc": float(np.mean([w[1] for w in window])) if window else float("nan")}
    if src_acc < d.floor:
        model.load_state_dict(st.best["state"])
        st.opt.load_state_dict(copy.deepcopy(st.best["opt"]))
        st.weight /= 2
        row["rolled_back_to"] = st.best["step"]
    elif proxy <= st.best["proxy"]:
        st.best = {"state": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(st.opt.state_dict()),
                   "step": step, "proxy": proxy}
    st.history.append(row)
    return row


def _begin(model: nn.Module, d: _Data, cfg: HardenConfig, checkpoints: Checkpoints, dev) -> _State:
    """A resumed hardening's state, or a fresh one whose first candidate to ship is the input itself."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    saved = checkpoints.load("harden", dev)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        best = {"state": saved["best_state"], "opt": saved["best_opt"], "step": int(saved["best_step"]),
                "proxy": float(saved["best_proxy"])}
        return _State(opt, best, int(saved["step"]), float(saved["weight"]), json.loads(saved["history"]))
    shipped = _shippable(model, d.src)
    best = {"state": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "step": 0,
            "proxy": proxy_attack(shipped, d.tgt, d.tgt_held, cfg)}
    history = [{"step": 0, "source": evaluate(shipped, d.src_held), "input_source": d.floor + cfg.source_floor,
                "proxy": best["proxy"], "weight": cfg.suppress_weight}]
    return _State(opt, best, 0, cfg.suppress_weight, history)


def run_harden(model: nn.Module, data: ProtectionData, cfg: HardenConfig, checkpoints: Checkpoints) -> MethodResult:
    dev = data.device
    model = model.to(dev)
    mask = data.mask.to(dev) if data.mask is not None else None
    if mask is not None:
        mask.zero_masked_(model)
    src, src_held = _split(data.source, cfg.source_fraction, cfg.holdout, cfg.seed)
    tgt, tgt_held = _split(data.target, cfg.target_fraction, cfg.holdout, cfg.seed + TARGET_SEED_OFFSET)
    d = _Data(src, src_held, tgt, tgt_held, evaluate(model, src_held) - cfg.source_floor,  # the input, eval mode
              int(data.target.y.max()) + 1)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(True)
    st = _begin(model, d, cfg, checkpoints, dev)
    bar = progress(range(st.start, cfg.outer_steps), desc="harden", total=cfg.outer_steps - st.start)
    window: list[tuple[float, float]] = []
    for step in bar:
        meta, gen = _meta_gradient(model, mask, d, cfg, step, window)
        _outer_step(model, teacher, mask, st, d, meta, gen, cfg)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.outer_steps:
            row = _measure(model, st, d, cfg, step + 1, window)
            window = []
            bar.set_postfix(source=f"{row['source'] * 100:.1f}%", proxy=f"{row['proxy'] * 100:.1f}%",
                            sim=f"{row['sim_acc'] * 100:.1f}%", loss=f"{row['sim_loss']:.3f}")
            checkpoints.save("harden", _payload(model, st, step + 1))

    model.load_state_dict(st.best["state"])
    reestimate_bn(model, src, batch_size=256)
    model.eval()
    out_mask = mask.cpu() if mask is not None else MaskSet.ones(model.cpu(), prunable_names(model, "encoder"))
    return MethodResult(model, out_mask, st.history,
                        notes={"shipped_step": st.best["step"], "proxy_accuracy": st.best["proxy"],
                               "source_floor": d.floor})


def _payload(model: nn.Module, st: _State, step: int) -> dict:
    return {"model": model.state_dict(), "opt": st.opt.state_dict(), "step": step, "weight": st.weight,
            "best_state": st.best["state"], "best_opt": st.best["opt"], "best_step": st.best["step"],
            "best_proxy": st.best["proxy"], "history": json.dumps(st.history)}


METHOD = register_method(
    "harden", "meta-learned hardening: fine-tuning on the target a bad start under a distribution of attacks "
              "(on a source model or on NTP's / MAP's output; the mask stays exact)",
    HardenConfig, harden_needs, run_harden, refines=True)
