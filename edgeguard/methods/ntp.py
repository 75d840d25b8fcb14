"""NTP (Non-transferable Pruning, ECCV 2024): ADMM pruning of the encoder with a non-transferable loss and
a Fisher-space regulariser, so that even fine-tuning the pruned model on target data does worse than
training from scratch.

    L = CE(h_s f(x_s), y_s) − α·min(CE(h_t f(x_t), y_t), clip) + λ·S_B/S_W(f(x_t), y_t)

Decisions on the ambiguities of shared/methods/ntp.md §8, and why:
1. ADMM penalty: the squared (ρ/2)‖W − Z + U‖² (the reference's un-squared norm never lets W settle onto Z).
2. Z-step: global magnitude top-k of (W + U)⊙M, which hits the requested sparsity exactly, with a per-layer
   floor so no layer is pruned away; the sparsity rises on a cubic schedule over the first `ramp` of the
   iterations; pruning is monotone (M only loses entries).
3. What is pruned: the encoder's conv (and linear) weights, first conv included; BN affine parameters train
   but are not pruned; the heads are never pruned.
4. Fisher term: on the encoder output average-pooled to (B, C) and L2-normalised; S_W is the mean within-class
   variance over the classes present in the batch, S_B the variance of their means; < 2 classes gives 0.
5. Heads: h_s is the source model's head, h_t a copy trained on target data with the encoder frozen; both
   frozen during ADMM (as in the reference), only the encoder moves.
6. BatchNorm: the W-step runs BN in train mode on source and target batches separately; after ADMM and after
   recovery the running statistics are re-estimated on source data, so the shipped statistics are the
   source's (the reference scored 13 % in eval mode until its recovery).
7. Defender data: labelled source and target fractions (default 0.1 each, as the reference).
8. The NTL-style MMD ablation (`loss=mmd`) lost to the Fisher term on SLC-AUC and was removed (RESULTS,
   "One attacker (issue 28 …)"); `loss` keeps one choice so configs written earlier still load.
9. Recovery: masked epochs on source data (encoder + h_s) plus the same clipped −α_rec·CE_t term on target
   data (`recovery_alpha`), so that recovering the source does not recover the target too.
10. `experimental.sim_weight` (OUR addition, off by default): the recovery also subtracts β·min(target CE
   after `sim_steps` differentiable SGD steps of a simulated fine-tuning attack, clip), second order;
   `sim_attack=both` alternates the masked attack and one where pruned weights may regrow. It moves the
   trade-off but costs source accuracy and is bound to its recipe.
Measurements behind each choice: benchmarks/RESULTS.md (NTP sections).
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bn_stats import reestimate_bn
from ..config import param
from ..errors import EdgeguardError
from ..finetune.unrolled import simulated_attack_loss
from ..masks import MaskSet, prunable_names
from ..models.registry import input_of
from ..progress import progress
from ..training import (
    TensorData,
    augment,
    inner_recipe,
    normalize,
    paired_batches,
    run_loop,
    train_classifier,
)
from .base import Checkpoints, DataNeeds, MethodResult, ProtectionData, register_method

log = logging.getLogger(__name__)
TARGET_SEED_OFFSET = 1  # the target fraction is drawn with seed + 1 (the source fraction with seed)
RECOVERY_SEED_OFFSET = 99  # the recovery's batches and augmentation: seed + 99
WSTEP_SEED_STRIDE = 1000  # W-step of ADMM iteration i: seed · 1000 + i
BN_BATCH, BN_MAX_BATCHES = 256, 50  # BatchNorm re-estimation: up to 50 batches of 256 source images


@dataclass(frozen=True)
class NtpExperimental:
    """The simulated fine-tuning attack in the recovery (decision 10): off by default, RESULTS 'NTP with a
    simulated fine-tuning attack' has its trade-off curve."""

    sim_weight: float = param(0.0, "β: recovery subtracts β·min(target CE after a simulated attack, clip)")
    sim_steps: int = param(3, "inner SGD steps of the simulated attack (differentiated through)")
    sim_lr: float = param(0.01, "inner SGD learning rate of the simulated attack")
    sim_clip: float | None = param(10.0, "cap on the attacked CE (None: ln K, chance level)")
    sim_attack: str = param("both", "pruned weights during the simulated attack: held at 0, free, or alternate",
                              choices=("masked", "free", "both"))


@dataclass
class NtpConfig:
    sparsity: float = param(0.9, "exact fraction of the encoder's weights pruned")
    alpha: float = param(0.1, "α: weight of the clipped target CE (subtracted)")
    lam: float = param(1.0, "λ: weight of the Fisher ratio on target features")
    rho: float = param(0.01, "ρ: ADMM penalty")
    clip: float = param(10.0, "clip of the target CE")
    layer_floor: float = param(0.01, "each layer keeps at least this fraction of its weights")
    iterations: int = param(20, "ADMM iterations")
    ramp: float = param(0.7, "fraction of the iterations over which the sparsity rises to the request")
    epochs: int = param(2, "W-step epochs per ADMM iteration")
    lr: float = param(1e-3, "W-step Adam learning rate")
    weight_decay: float = param(8e-4, "W-step weight decay")
    batch_size: int = param(128, "batch size of every NTP loop")
    augment_shift: int = param(2, "random translation (pixels) of every batch")
    source_fraction: float = param(0.1, "fraction of the source training set the defender uses")
    target_fraction: float = param(0.1, "fraction of the (labelled) target training set the defender uses")
    head_epochs: int = param(5, "epochs of the target head h_t (linear probe on the frozen encoder)")
    head_lr: float = param(1e-3, "learning rate of h_t")
    head_weight_decay: float = param(8e-4, "weight decay of h_t")
    recovery_epochs: int = param(2, "masked recovery epochs on source data after ADMM (0: none)")
    recovery_lr: float = param(1e-3, "recovery learning rate")
    recovery_weight_decay: float = param(8e-4, "recovery weight decay")
    recovery_alpha: float = param(0.03, "weight of the clipped target CE during recovery")
    loss: str = param("fisher", "non-transferable loss: NTP's Fisher term", choices=("fisher",))
    experimental: NtpExperimental = param(factory=NtpExperimental, help="off-by-default experiments")
    seed: int = param(0, "seed of the data fractions, batch order, augmentation and heads")

    RETIRED = ("mmd_ce_clip", "mmd_clip")  # keys of a removed experiment, ignored in config files written earlier

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise EdgeguardError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0 < self.source_fraction <= 1 or not 0 < self.target_fraction <= 1:
            raise EdgeguardError("source and target fractions must be in (0, 1]")
        if self.loss != "fisher":
            raise EdgeguardError(f"NTP loss must be fisher (the mmd ablation was removed), got {self.loss!r}")
        if self.rho <= 0 or self.lr <= 0 or self.iterations < 1 or self.epochs < 1 or self.batch_size < 1:
            raise EdgeguardError("rho, lr, iterations, epochs and batch_size must be positive")
        if min(self.head_epochs, self.recovery_epochs, self.augment_shift) < 0 or not 0 < self.ramp <= 1:
            raise EdgeguardError("head_epochs, recovery_epochs and augment_shift must be ≥ 0, ramp in (0, 1]")
        if not 0 <= self.layer_floor < 1:
            raise EdgeguardError(f"layer_floor must be in [0, 1), got {self.layer_floor}")
        x = self.experimental
        if x.sim_weight < 0 or x.sim_steps < 1 or x.sim_lr <= 0:
            raise EdgeguardError("sim_weight must be ≥ 0, sim_steps ≥ 1 and sim_lr > 0")
        if x.sim_attack not in ("masked", "free", "both"):
            raise EdgeguardError(f"sim_attack must be masked, free or both, got {x.sim_attack!r}")


def ntp_needs(cfg: NtpConfig) -> DataNeeds:
    return DataNeeds(source_images=True, source_labels=True, target_images=True, target_labels=True)


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """S_B / S_W of L2-normalised pooled features over the classes present in the batch (decision 4)."""
    f = F.normalize(features.float(), dim=1)
    classes = labels.unique()
    if len(classes) < 2:
        return f.sum() * 0.0
    means, within = [], []
    for c in classes:
        fc = f[labels == c]
        mu = fc.mean(0)
        means.append(mu)
        within.append(((fc - mu) ** 2).mean())
    mu_c = torch.stack(means)
    s_b = ((mu_c - mu_c.mean(0)) ** 2).mean()
    s_w = torch.stack(within).mean()
    return s_b / (s_w + eps)


def project_topk(values: dict[str, torch.Tensor], sparsity: float, floor: float) -> dict[str, torch.Tensor]:
    """Keep-mask with exactly round((1 − s)·N) entries: global magnitude top-k, each layer keeping at least
    max(1, floor·n_l) of its own largest entries (decision 2)."""
    names = list(values)
    total = sum(v.numel() for v in values.values())
    k_total = max(len(names), int(round((1 - sparsity) * total)))
    keep = {n: torch.zeros_like(v, dtype=torch.bool) for n, v in values.items()}
    reserved = 0
    for n, v in values.items():  # per-layer floor first
        kf = max(1, int(math.ceil(floor * v.numel())))
        idx = v.abs().flatten().topk(min(kf, v.numel())).indices
        keep[n].view(-1)[idx] = True
        reserved += len(idx)
    rest = max(0, k_total - reserved)
    if rest:
        flat = torch.cat([torch.where(keep[n].flatten(), torch.full_like(values[n].flatten(), -1.0),
                                      values[n].abs().flatten()) for n in names])
        idx = flat.topk(rest).indices
        offsets = np.cumsum([0] + [values[n].numel() for n in names])
        for i, n in enumerate(names):
            sel = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - int(offsets[i])
            keep[n].view(-1)[sel] = True
    return keep


def scheduled_sparsity(cfg: NtpConfig, iteration: int) -> float:
    """Cubic ramp (Zhu & Gupta): from 0 to cfg.sparsity over the first `ramp` of the iterations."""
    span = max(1, int(round(cfg.ramp * cfg.iterations)))
    t = min(1.0, (iteration + 1) / span)
    return cfg.sparsity * (1 - (1 - t) ** 3)


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C): a feature map average-pooled, or an imported encoder's feature vector as it is."""
    return feature_map if feature_map.dim() == 2 else torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)


def ntp_objective(ce_s: torch.Tensor, ce_t: torch.Tensor, f_s: torch.Tensor, f_t: torch.Tensor,
                  y_t: torch.Tensor, cfg: NtpConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-transferable loss (without the ADMM penalty) and its regulariser's value (`f_s` is kept for the
    callers' symmetry: the Fisher term reads the target features only)."""
    reg = fisher_ratio(f_t, y_t)
    return ce_s - cfg.alpha * torch.clamp(ce_t, max=cfg.clip) + cfg.lam * reg, reg


def recovery_objective(ce_s: torch.Tensor, ce_t: torch.Tensor, cfg: NtpConfig,
                       sim: torch.Tensor | None = None, sim_clip: float = 10.0) -> torch.Tensor:
    """Source CE − α_rec·min(CE_t, clip) [− β·min(simulated-attack CE, sim_clip)] (decisions 9, 10)."""
    loss = ce_s - cfg.recovery_alpha * torch.clamp(ce_t, max=cfg.clip)
    if sim is not None:
        loss = loss - cfg.experimental.sim_weight * torch.clamp(sim, max=sim_clip)
    return loss


def train_head(model: nn.Module, data: TensorData, cfg: NtpConfig, device: torch.device, desc: str) -> None:
    """A linear probe: train `model.head` on `data` with the encoder frozen (its BN stays in eval mode)."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    recipe = inner_recipe(cfg.head_epochs, cfg.head_lr, cfg.batch_size, cfg.seed, device,
                          weight_decay=cfg.head_weight_decay, augment_shift=cfg.augment_shift)
    train_classifier(model, data, recipe, params=model.head.parameters(), train_modules={"head": model.head},
                     desc=desc)


def _fraction(d: TensorData, frac: float, seed: int) -> TensorData:
    n = max(1, int(round(frac * len(d))))
    return d.take(np.sort(np.random.default_rng(seed).permutation(len(d))[:n]))


def _n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _heads(model: nn.Module, tgt: TensorData, cfg: NtpConfig, dev) -> tuple[nn.Module, nn.Module]:
    """(h_t, h_s), both frozen: a copy of the head trained on target data with the encoder frozen, and the
    source model's own head."""
    h_t_model = copy.deepcopy(model)
    train_head(h_t_model, tgt, cfg, dev, "NTP h_t")
    h_t = h_t_model.head.eval()
    h_s = model.head.eval()
    for p in list(h_t.parameters()) + list(h_s.parameters()):
        p.requires_grad_(False)
    return h_t, h_s


def run_ntp(model: nn.Module, data: ProtectionData, cfg: NtpConfig, checkpoints: Checkpoints) -> MethodResult:
    """ADMM pruning with the non-transferable loss, then the masked source recovery (decisions 1-10)."""
    dev = data.device
    model = model.to(dev)
    src = _fraction(data.source, cfg.source_fraction, cfg.seed)
    tgt = _fraction(data.target, cfg.target_fraction, cfg.seed + TARGET_SEED_OFFSET)

    h_t, h_s = _heads(model, tgt, cfg, dev)

    names = prunable_names(model, "encoder")
    params = dict(model.named_parameters())
    W = {n: params[n] for n in names}
    Z = {n: W[n].detach().clone() for n in names}
    U = {n: torch.zeros_like(W[n]) for n in names}
    M = {n: torch.ones_like(W[n], dtype=torch.bool) for n in names}
    mask = MaskSet(M)  # shares M's tensors: the Z-step's in-place updates are the training mask's
    history: list[dict] = []
    start_it = 0
    st = checkpoints.load("ntp_admm", dev)
    if st is not None:
        model.load_state_dict(st["model"])
        h_t.load_state_dict(st["h_t"])
        for n in names:
            Z[n].copy_(st[f"Z.{n}"])
            U[n].copy_(st[f"U.{n}"])
            M[n].copy_(st[f"M.{n}"])
        start_it, history = int(st["iteration"]), json.loads(st["history"])

    steps = min(_n_batches(len(src), cfg.batch_size), _n_batches(len(tgt), cfg.batch_size))
    enc_params = list(model.encoder.parameters())
    spec = input_of(model)

    def batches(epoch, gen):
        for s, t in paired_batches(src, tgt, gen, steps, cfg.batch_size, equal_size=True):
            yield s, t, gen

    def step(item):
        s, t, gen = item
        xs, xt = augment(normalize(s.x, spec), gen, cfg.augment_shift), augment(normalize(t.x, spec), gen, cfg.augment_shift)
        fs_map, ft_map = model.encoder(xs), model.encoder(xt)  # separate passes: per-domain BN batch stats
        ce_s = F.cross_entropy(h_s(fs_map).float(), s.y)
        ce_t = F.cross_entropy(h_t(ft_map).float(), t.y)
        loss, reg = ntp_objective(ce_s, ce_t, pooled(fs_map), pooled(ft_map), t.y, cfg)
        admm = sum(((W[n] - Z[n] + U[n]) ** 2).sum() for n in names) * (cfg.rho / 2)
        return loss + admm, {"ce_s": float(ce_s.detach()), "ce_t": float(ce_t.detach()), "reg": float(reg.detach()),
                             "admm": float(admm.detach())}

    bar = progress(range(start_it, cfg.iterations), desc="NTP ADMM", total=cfg.iterations - start_it)
    for it in bar:
        model.encoder.train()
        tcfg = inner_recipe(cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed * WSTEP_SEED_STRIDE + it, dev,
                            weight_decay=cfg.weight_decay)
        state = run_loop({"encoder": model.encoder}, enc_params, tcfg, batches, step,
                         before_step=lambda: mask.mask_grads_(model), after_step=lambda: mask.zero_masked_(model),
                         desc=f"NTP W-step {it + 1}", steps_per_epoch=steps)
        s_k = scheduled_sparsity(cfg, it)
        with torch.no_grad():
            keep = project_topk({n: (W[n] + U[n]) * M[n] for n in names}, s_k, cfg.layer_floor)
            for n in names:
                M[n] &= keep[n]
                Z[n] = (W[n] + U[n]) * M[n]
                U[n] = U[n] + W[n] - Z[n]
        kept, total = mask.counts()
        history.append({"iteration": it + 1, "sparsity": 1 - kept / total, "target_sparsity": s_k,
                        **state.history[-1]})
        payload = {"model": model.state_dict(), "h_t": h_t.state_dict(), "iteration": torch.tensor(it + 1),
                   "history": json.dumps(history),
                   **{f"{k}.{n}": v[n] for k, v in (("Z", Z), ("U", U), ("M", M)) for n in names}}
        checkpoints.save("ntp_admm", payload)

    mask = MaskSet({n: M[n].detach().clone() for n in names})
    mask.bake_(model)
    reestimate_bn(model, src, BN_BATCH, BN_MAX_BATCHES, shuffle_seed=0)
    model.eval()  # the recovery's head training keeps the encoder's statistics
    if cfg.recovery_epochs:
        _recover(model, h_t, src, tgt, mask, cfg, data.num_classes, dev)
        reestimate_bn(model, src, BN_BATCH, BN_MAX_BATCHES, shuffle_seed=0)
    model.eval()
    return MethodResult(model, mask.cpu(), history)


def _recover(model: nn.Module, h_t: nn.Module, src: TensorData, tgt: TensorData, mask: MaskSet, cfg: NtpConfig,
             num_classes: int, dev: torch.device) -> None:
    """Masked recovery: encoder + h_s on source data, with the clipped −α_rec·CE_t term on target data
    (decision 9) and, where enabled, the simulated attack (decision 10)."""
    x = cfg.experimental
    sim_clip = x.sim_clip if x.sim_clip is not None else math.log(num_classes)
    # which simulated attack each recovery step runs: the mask held (masked), pruned weights free, or both
    spec = input_of(model)
    sim_keeps = itertools.cycle({"masked": [mask.masks], "free": [None], "both": [mask.masks, None]}[x.sim_attack])

    def rec_step(item):
        s, t, gen = item
        xs, xt = augment(normalize(s.x, spec), gen, cfg.augment_shift), augment(normalize(t.x, spec), gen, cfg.augment_shift)
        ce_s = F.cross_entropy(model(xs).float(), s.y)
        ce_t = F.cross_entropy(h_t(model.encoder(xt)).float(), t.y)
        metrics = {"ce_s": float(ce_s.detach()), "ce_t": float(ce_t.detach())}
        sim = None
        if x.sim_weight and len(t) >= 4:  # fine-tune on one half of the target batch, score on the other
            h = len(t) // 2
            sim = simulated_attack_loss(model, xt[:h], t.y[:h], xt[h:], t.y[h:], x.sim_steps, x.sim_lr,
                                        next(sim_keeps))
            metrics["sim"] = float(sim.detach())
        return recovery_objective(ce_s, ce_t, cfg, sim, sim_clip), metrics

    steps = _n_batches(len(src), cfg.batch_size)

    def rec_batches(epoch, gen):  # every source batch once; target batches cycle alongside
        for s, t in paired_batches(src, tgt, gen, steps, cfg.batch_size):
            yield s, t, gen

    rcfg = inner_recipe(cfg.recovery_epochs, cfg.recovery_lr, cfg.batch_size, cfg.seed + RECOVERY_SEED_OFFSET, dev,
                        weight_decay=cfg.recovery_weight_decay)
    for p in model.parameters():
        p.requires_grad_(True)
    model.head.train()
    run_loop({"model": model}, model.parameters(), rcfg, rec_batches, rec_step,
             before_step=lambda: mask.mask_grads_(model), after_step=lambda: mask.zero_masked_(model),
             desc="NTP recovery", steps_per_epoch=steps)


METHOD = register_method(
    "ntp", "NTP (ECCV 2024): ADMM pruning of the encoder with a non-transferable loss, then masked recovery",
    NtpConfig, ntp_needs, run_ntp)
