"""MAP (MAsk Pruning, CVPR 2024), a clean-room reconstruction: frozen source weights + a learned binary mask.

What is MAP's (shared/methods/map.md §1-2): the source model is frozen; only a target-specific binary mask is
learned, so that the masked model keeps the authorised (source) domain and loses the unauthorised (target)
one; three settings: source-available, source-free (pseudo-source data), data-free (pseudo-source and
"neighbour domains").

What is OUR design (the paper's recipe was not available to us):
- the mask: one real score per conv/linear weight (BN and biases frozen, unmasked), hard threshold
  m = 1[S ≥ 0] in the forward pass with a straight-through gradient; scores start at +margin, so the mask
  starts all-ones and the model starts exactly as the source model; an optional cap on the pruned fraction
  (global or per layer) and a `2:4` structure;
- BatchNorm stays in eval mode with the source model's running statistics (the shipped statistics);
- `map_objective`: KL distillation from the frozen model (+ CE where source labels exist) on source images,
  minus a per-sample clipped KL away from the frozen model's answers on target images (no target labels);
- each epoch's hard mask is scored on held-out images (source agreement weighted `select_source_weight`,
  target agreement; ties broken by the held-out source KL) and the best one is kept: the hard mask flips
  often, the last one is not the best;
- a repair phase (`repair_objective`): the scores restart from the chosen mask and train on the source terms
  plus a KL that holds the chosen mask's target answers, so weights the source needs may grow back;
- pseudo-source for source-free / data-free: DeepInversion (methods/synthesis.py), started from the defender's
  target images in source-free (their content restyled to the source's statistics) and from noise in
  data-free, whose targets are "neighbour domains" made from it; without real source images the mask's
  pruned share is chosen by a budget rule in source-free (`next_cap`: the cap starts small and doubles, epoch
  by epoch, only while the held-out target is not yet suppressed in the model as shipped and the held-out
  pseudo-source is still kept; it halves when the pseudo-source is lost) and capped at `data_free_cap` in
  data-free (neighbour domains are never suppressed like a real target, so the rule climbs to its ceiling
  there and loses the source), and at the end the masked model's BatchNorm
  statistics are moved by the shift the mask causes on the pseudo-source (`recalibrate`): the pseudo-source
  sees that shift as the real source does, and undoing it gives back much of the real source the mask cost
  (weights and mask unchanged; only the running statistics move).
Every choice and its measurement: benchmarks/RESULTS.md (MAP sections).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..bn_stats import carry_bn_shift, reestimated_copy
from ..config import param
from ..errors import EdgeguardError
from ..masks import MaskSet, apply_n_m, masked_params, prunable_names
from ..models.registry import input_of
from ..training import (
    TensorData,
    augment,
    distillation_loss,
    inner_recipe,
    normalize,
    paired_batches,
    predict_logits,
    run_loop,
)
from .base import Checkpoints, DataNeeds, MethodResult, ProtectionData, register_method
from .synthesis import SynthesisConfig, cached_pseudo_source, neighbour_domains

log = logging.getLogger(__name__)
SETTINGS = ("source-available", "source-free", "data-free")
HOLDOUT_SEED_OFFSET = 17  # the held-out selection slices are drawn with seed + 17
REPAIR_SEED_OFFSET = 1  # the repair phase's batches and augmentation: seed + 1
NEIGHBOUR_COPIES = 7  # neighbour_domains makes 7 perturbed copies of each pseudo-source image


@dataclass(frozen=True)
class MapExperimental:
    """Off by default; kept because RESULTS shows a use (a lower target accuracy at a source cost)."""

    tgt_shift: float = param(0.0, "CE towards (frozen answer + 1) mod K on target images: spreads the target "
                               "answers over wrong classes (costs source accuracy; RESULTS 'MAP target objective')")


@dataclass
class MapConfig:
    setting: str = param("source-available", "which data the defender has", choices=SETTINGS)
    layers: str = param("all", "which layers are masked", choices=("all", "encoder", "head"))
    sparsity_cap: float | None = param(None, "at most this fraction of the masked weights is pruned (None: no cap)")
    budget_start: float = param(0.005, "source-free with sparsity_cap None: the budget rule's first cap (doubled "
                                  "per epoch while the target is not suppressed; next_cap)")
    budget_max: float = param(0.05, "the budget rule's largest cap")
    suppressed_margin: float = param(0.05, "the target counts as suppressed once the held-out target agreement "
                                       "is within this of answers independent of the image (next_cap)")
    keep_source: float = param(0.98, "the budget rule climbs only while the held-out pseudo-source agreement is "
                                 "at least this, and steps down below it")
    data_free_cap: float = param(0.03, "the sparsity cap in data-free when sparsity_cap is None (its target is only "
                                   "the neighbour domains, which the budget rule cannot judge; RESULTS)")
    budget: str = param("global", "apply the cap over all layers together or per layer",
                          choices=("global", "layer"))
    structure: str | None = param(None, "None, or 2:4 (keep 2 of every 4 consecutive input weights)")
    epochs: int = param(12, "epochs of mask learning (an epoch is one pass over the target images)")
    batch_size: int = param(128, "target images per step")
    source_batch_ratio: int = param(1, "source images per target image in each step")
    lr: float = param(0.01, "Adam learning rate of the mask scores")
    scheduler: str = param("none", "score learning-rate schedule", choices=("none", "cosine"))
    margin: float = param(0.1, "initial score magnitude (scores start at +margin: the all-ones mask)")
    temperature: float = param(2.0, "distillation temperature of the source term")
    src_kl: float = param(1.0, "weight of the KL distillation on source images")
    src_ce: float = param(1.0, "weight of the CE on source labels (source-available only)")
    tgt_away: float = param(1.0, "weight of the clipped KL away from the frozen model's target answers")
    clip: float = param(3.0, "per-sample clip of that KL")
    select_source_weight: float = param(10.0, "mask selection score: this·(1 − source agreement) + target "
                                          "agreement on held-out images (lower is better)")
    holdout: int = param(1000, "held-out images per domain for the selection (at most a tenth of the source)")
    augment_shift: int = param(1, "random translation (pixels) of every batch")
    repair_epochs: int = param(4, "repair phase epochs (0: none)")
    repair_target: float = param(1.0, "weight of the KL that holds the chosen mask's target answers in repair")
    recalibrate: bool = param(True, "source-free / data-free: move the masked model's BatchNorm statistics by the "
                              "shift the mask causes on the pseudo-source (bn_stats.carry_bn_shift)")
    max_source: int | None = param(20000, "defender's source images per run (source-available)")
    max_target: int | None = param(20000, "defender's target images per run (an epoch is one pass over them)")
    synth: SynthesisConfig = param(factory=SynthesisConfig, help="pseudo-source synthesis (source-free, data-free)")
    experimental: MapExperimental = param(factory=MapExperimental, help="off-by-default experiments")
    seed: int = param(0, "seed of the data caps, held-out slices, batch order and augmentation")

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise EdgeguardError(f"--setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.sparsity_cap is not None and not 0 < self.sparsity_cap < 1:
            raise EdgeguardError(f"sparsity_cap must be in (0, 1), got {self.sparsity_cap}")
        if not 0 < self.budget_start <= self.budget_max < 1:
            raise EdgeguardError(f"need 0 < budget_start ≤ budget_max < 1, got {self.budget_start} and "
                                 f"{self.budget_max}")
        if not 0 < self.data_free_cap <= 1:
            raise EdgeguardError(f"data_free_cap must be in (0, 1] (1: no cap), got {self.data_free_cap}")
        if not 0 <= self.suppressed_margin < 1 or not 0 < self.keep_source <= 1:
            raise EdgeguardError("suppressed_margin must be in [0, 1) and keep_source in (0, 1]")
        if self.structure not in (None, "2:4"):
            raise EdgeguardError(f"structure supports only 2:4 (or None), got {self.structure!r}")
        if min(self.tgt_away, self.src_kl, self.src_ce, self.repair_target, self.repair_epochs,
               self.experimental.tgt_shift) < 0:
            raise EdgeguardError("loss coefficients must be ≥ 0 (the signs are built into the losses)")
        if self.epochs < 1 or self.batch_size < 1 or self.source_batch_ratio < 1 or not self.lr > 0:
            raise EdgeguardError("epochs, batch_size, source_batch_ratio and lr must be positive")
        if not self.temperature > 0 or not self.clip > 0 or self.holdout < 1 or self.augment_shift < 0:
            raise EdgeguardError("temperature, clip and holdout must be positive, augment_shift ≥ 0")
        for name, cap in (("max_source", self.max_source), ("max_target", self.max_target)):
            if cap is not None and cap < 1:
                raise EdgeguardError(f"{name} must be ≥ 1 (or None: no cap), got {cap}")
        self.synth.validate()


def map_needs(cfg: MapConfig) -> DataNeeds:
    if cfg.setting == "source-available":
        return DataNeeds(source_images=True, source_labels=True, target_images=True)
    if cfg.setting == "source-free":
        return DataNeeds(target_images=True)
    return DataNeeds()


def initial_scores(w: torch.Tensor, margin: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """±margin·(1 + |w|/max|w|): the sign sets the mask (+ keep), magnitude breaks ties (2:4, caps)."""
    mag = w.abs() / (w.abs().max() + 1e-12)
    sign = 1.0 if keep is None else keep.to(w.dtype) * 2 - 1
    return sign * margin * (1.0 + mag)


class MaskScores(nn.Module):
    """Learnable scores for the prunable weights of a frozen model, and the (straight-through) masks."""

    def __init__(self, model: nn.Module, names: list[str], cfg: MapConfig):
        super().__init__()
        params = dict(model.named_parameters())
        self.names = names
        self.cfg = cfg
        # Every score starts ≥ margin: the mask starts all-ones and the model as the source model.
        self.scores = nn.ParameterList([nn.Parameter(initial_scores(params[n].detach(), cfg.margin)) for n in names])
        # The pruned share's cap (1: none); a buffer, so the budget rule's moves are checkpointed with the scores.
        cap = 1.0 if cfg.sparsity_cap is None else cfg.sparsity_cap
        self.register_buffer("cap", torch.tensor(cap, dtype=torch.float64))

    def keep(self) -> list[torch.Tensor]:
        """Hard keep-decisions (bool) per layer."""
        ss = [s.detach() for s in self.scores]
        keeps = [s >= 0 for s in ss]
        if self.cfg.structure == "2:4":
            keeps = [k & apply_n_m(s, 2, 4) if s.dim() > 1 else k for k, s in zip(keeps, ss)]
        if float(self.cap) < 1:
            caps = self._cap_thresholds(ss)
            keeps = [k | (s >= t) for k, s, t in zip(keeps, ss, caps)]
            if self.cfg.structure == "2:4":
                keeps = [k & apply_n_m(s, 2, 4) if s.dim() > 1 else k for k, s in zip(keeps, ss)]
        return keeps

    def _cap_thresholds(self, ss: list[torch.Tensor]) -> list[torch.Tensor]:
        q = float(self.cap)
        if self.cfg.budget == "layer":
            return [torch.quantile(s.flatten().float()[: 16_000_000], q) for s in ss]
        flat = torch.cat([s.flatten() for s in ss])
        k = max(1, int(math.floor(q * flat.numel())))
        thr = flat.kthvalue(k).values if k < flat.numel() else flat.max()
        return [thr] * len(ss)

    def soft_masks(self) -> list[torch.Tensor]:
        """Forward value = hard mask; gradient w.r.t. the score = identity (straight-through)."""
        return [k.to(s.dtype) + s - s.detach() for k, s in zip(self.keep(), self.scores)]

    def maskset(self) -> MaskSet:
        return MaskSet({n: k.cpu() for n, k in zip(self.names, self.keep())})


def masked_forward(model: nn.Module, scores: MaskScores, x: torch.Tensor) -> torch.Tensor:
    """The frozen model with the scores' straight-through masks applied (gradients reach the scores)."""
    return functional_call(model, masked_params(model, dict(zip(scores.names, scores.soft_masks()))), (x,))


def source_objective(student_s, teacher_s, y_s, cfg: MapConfig, has_labels: bool):
    """T²·KL(frozen ‖ masked) on source images, + CE where source labels exist."""
    kl_s = distillation_loss(student_s, teacher_s, cfg.temperature)
    loss = cfg.src_kl * kl_s
    metrics = {"src_kl": float(kl_s.detach())}
    if has_labels and cfg.src_ce:
        ce = F.cross_entropy(student_s, y_s)
        loss = loss + cfg.src_ce * ce
        metrics["src_ce"] = float(ce.detach())
    return loss, metrics


def map_objective(student_s, teacher_s, y_s, student_t, teacher_t, cfg: MapConfig, has_labels: bool):
    """Main phase: the source terms − tgt_away·mean(min(KL(p_frozen ‖ p), clip)) on target images."""
    loss, metrics = source_objective(student_s, teacher_s, y_s, cfg, has_labels)
    logp_t = F.log_softmax(student_t, 1)
    p_teach = F.softmax(teacher_t, 1)
    kl_away = (p_teach * (torch.log(p_teach + 1e-12) - logp_t)).sum(1)  # per sample, clipped per sample
    loss = loss - cfg.tgt_away * torch.clamp(kl_away, max=cfg.clip).mean()
    metrics["tgt_kl_away"] = float(kl_away.mean().detach())
    if cfg.experimental.tgt_shift:  # a derangement of the frozen model's own answers (no labels)
        shifted = (teacher_t.argmax(1) + 1) % student_t.shape[1]
        ce_shift = F.cross_entropy(student_t, shifted)
        loss = loss + cfg.experimental.tgt_shift * ce_shift
        metrics["tgt_shift_ce"] = float(ce_shift.detach())
    return loss, metrics


def repair_objective(student_s, teacher_s, y_s, student_t, protected_t, cfg: MapConfig, has_labels: bool):
    """Repair phase: the source terms + repair_target·KL(chosen mask's answers ‖ p) on target images, which
    holds the main phase's target answers while weights the source needs may grow back."""
    loss, metrics = source_objective(student_s, teacher_s, y_s, cfg, has_labels)
    keep = distillation_loss(student_t, protected_t, 1.0)
    metrics["tgt_keep_kl"] = float(keep.detach())
    return loss + cfg.repair_target * keep, metrics


def selection_key(src_agree: float, src_kl: float, tgt_agree: float, source_weight: float) -> tuple[float, float]:
    """How an epoch's hard mask ranks (lower is better): source_weight·(1 − held-out source agreement) + held-out
    target agreement, then the held-out source KL(frozen ‖ masked). Agreements are counts, so the first part
    ties (a collapsed target and a fully kept held-out pseudo-source from the first epoch on): without the KL
    the first epoch's crude mask was kept (RESULTS, "the selection tie")."""
    return source_weight * (1 - src_agree) + tgt_agree, src_kl


def next_cap(cap: float, src_agree: float, tgt_agree: float, tgt_chance: float, cfg: MapConfig) -> float:
    """The budget rule (source-free): the least pruning that suppresses the target and keeps the
    pseudo-source. Halve the cap (not below budget_start) when the held-out pseudo-source agreement falls under
    keep_source; double it (not above budget_max) while the held-out target agreement is still above the
    chance agreement of answers independent of the image (`tgt_chance`) + suppressed_margin; otherwise keep it.
    Small caps lose little after the BatchNorm shift is carried out; large ones prune what the real source
    needs and the pseudo-source cannot see (RESULTS)."""
    if src_agree < cfg.keep_source:
        return max(cfg.budget_start, cap / 2)
    if tgt_agree > tgt_chance + cfg.suppressed_margin:
        return min(cfg.budget_max, cap * 2)
    return cap


def _track_best(scores: MaskScores) -> None:
    """Buffers for the best mask so far, its cap and selection key (checkpointed with the scores)."""
    for i, k in enumerate(scores.keep()):
        scores.register_buffer(f"best_{i}", k.clone())
    scores.register_buffer("best_cap", scores.cap.clone())
    scores.register_buffer("best_score", torch.tensor(float("inf"), device=scores.cap.device))
    scores.register_buffer("best_kl", torch.tensor(float("inf"), device=scores.cap.device))  # the tie-breaker


@torch.no_grad()
def masked_agreement(model: nn.Module, scores: MaskScores, data: TensorData,
                     reference: torch.Tensor) -> tuple[float, float]:
    """The masked model's argmax agreement with the frozen model's logits `reference`, and the mean
    KL(frozen ‖ masked)."""
    spec = input_of(model)
    out = torch.cat([masked_forward(model, scores, normalize(data.x[i : i + 512], spec)).float()
                     for i in range(0, len(data), 512)])
    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean")
    return float((out.argmax(1) == reference.argmax(1)).float().mean()), float(kl)


def learn_mask(model: nn.Module, source: TensorData, target: TensorData, cfg: MapConfig, has_labels: bool,
               device: torch.device, checkpoints: Checkpoints, budget_rule: bool = False) -> tuple[MaskSet, list]:
    """Learn the mask on (source, target) batches; the model's weights never change. With `budget_rule` the
    cap moves after each main-phase epoch (next_cap) and the repair keeps the chosen mask's cap."""
    model = model.to(device).eval().to(memory_format=torch.channels_last)  # NHWC convs: faster, same maths
    for p in model.parameters():
        p.requires_grad_(False)
    names = prunable_names(model, cfg.layers)
    scores = MaskScores(model, names, cfg).to(device)
    pseudo, target = source.to(device), target.to(device)  # pseudo: all of it, as run_map carries the shift on
    source, held_src, held_tgt, frozen_src, frozen_tgt = _holdouts(model, pseudo, target, cfg)
    _track_best(scores)
    ref_on_pseudo = reestimated_copy(model, pseudo) if budget_rule and cfg.recalibrate else None  # made once
    steps = math.ceil(len(target) / cfg.batch_size)  # an epoch is one pass over the target set

    def batches(epoch: int, gen: torch.Generator):
        for s, t in paired_batches(source, target, gen, steps, cfg.batch_size * cfg.source_batch_ratio,
                                   cfg.batch_size):
            yield s, t, gen

    spec = input_of(model)
    protected: dict[str, nn.Module] = {}  # the main phase's masked model, during the repair phase

    def step(item):
        s, t, gen = item
        xs = augment(normalize(s.x, spec), gen, cfg.augment_shift)
        xt = augment(normalize(t.x, spec), gen, cfg.augment_shift)
        x = torch.cat([xs, xt]).contiguous(memory_format=torch.channels_last)  # BN in eval mode: one pass is exact
        n = len(xs)
        with torch.no_grad():
            teach = model(x).float()
            held = protected["model"](xt).float() if protected else None
        stud = masked_forward(model, scores, x).float()
        if held is None:
            return map_objective(stud[:n], teach[:n], s.y, stud[n:], teach[n:], cfg, has_labels)
        return repair_objective(stud[:n], teach[:n], s.y, stud[n:], held, cfg, has_labels)

    def end_of_epoch(epoch: int) -> dict[str, float]:
        ms = scores.maskset()
        (src_agree, src_kl), (tgt_agree, _) = (masked_agreement(model, scores, held_src, frozen_src),
                                               masked_agreement(model, scores, held_tgt, frozen_tgt))
        score, _ = key = selection_key(src_agree, src_kl, tgt_agree, cfg.select_source_weight)
        if key < (float(scores.best_score), float(scores.best_kl)):
            scores.best_score.fill_(score)
            scores.best_kl.fill_(src_kl)
            scores.best_cap.copy_(scores.cap)
            for i, k in enumerate(scores.keep()):
                getattr(scores, f"best_{i}").copy_(k)
        row = {"sparsity": ms.sparsity(), "cap": float(scores.cap), "heldout_source_agreement": src_agree,
               "heldout_source_kl": src_kl, "target_agreement": tgt_agree, "selection_score": score}
        if budget_rule and not protected:  # the repair phase keeps the chosen mask's cap
            shipped = ship(model, ms, pseudo if cfg.recalibrate else None, ref_on_pseudo)
            (src_ship, _), (tgt_ship, tgt_chance) = shipped_agreement(shipped, [(held_src, frozen_src), (held_tgt, frozen_tgt)])
            row.update(shipped_source_agreement=src_ship, shipped_target_agreement=tgt_ship,
                       shipped_target_chance=tgt_chance)
            scores.cap.fill_(next_cap(float(scores.cap), src_ship, tgt_ship, tgt_chance, cfg))
        return row

    tcfg = inner_recipe(cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, device, scheduler=cfg.scheduler)
    state = run_loop({"scores": scores}, scores.parameters(), tcfg, batches, step, end_of_epoch=end_of_epoch,
                     checkpoint=checkpoints.path("map"), resume=checkpoints.resume, desc=f"MAP {cfg.setting}",
                     steps_per_epoch=steps)
    history = state.history

    def chosen() -> MaskSet:  # the best mask so far (kept in the scores' buffers, so it is checkpointed)
        return MaskSet({n: getattr(scores, f"best_{i}").contiguous() for i, n in enumerate(names)})

    if cfg.repair_epochs:
        # Repair: restart the scores at ±margin from the chosen mask; the selection score is kept, so a
        # repaired mask replaces the chosen one only where it scores better.
        protected["model"] = _restart_at(model, scores, chosen(), names, cfg)
        scores.cap.copy_(scores.best_cap)
        rcfg = inner_recipe(cfg.repair_epochs, cfg.lr, cfg.batch_size, cfg.seed + REPAIR_SEED_OFFSET, device,
                            scheduler=cfg.scheduler)
        rstate = run_loop({"scores": scores}, scores.parameters(), rcfg, batches, step, end_of_epoch=end_of_epoch,
                          checkpoint=checkpoints.path("map_repair"), resume=checkpoints.resume,
                          desc=f"MAP {cfg.setting} repair", steps_per_epoch=steps)
        history = history + [{**row, "phase": "repair"} for row in rstate.history]
    model.to(memory_format=torch.contiguous_format)
    return chosen().cpu(), history


@torch.no_grad()
def ship(model: nn.Module, mask: MaskSet, pseudo: TensorData | None, reference_on_pseudo: nn.Module | None = None
         ) -> nn.Module:
    """The model as run_map ships it: a copy with the mask baked in and, given a pseudo-source, the BatchNorm
    shift the mask causes on it carried (`reference_on_pseudo`: the unmasked model re-estimated on it, if made)."""
    shipped = copy.deepcopy(model)
    mask.to(next(model.parameters()).device).bake_(shipped)
    if pseudo is not None:
        carry_bn_shift(shipped, model, pseudo, reference_on_pseudo)
    return shipped


@torch.no_grad()
def shipped_agreement(shipped: nn.Module, held: list[tuple[TensorData, torch.Tensor]]) -> list[tuple[float, float]]:
    """Per held-out (images, frozen logits) pair: the argmax agreement of the shipped model (`ship`) with the
    frozen model, and the agreement two models answering independently of the image with those answer
    frequencies would have (Σ_c p_frozen(c)·p_shipped(c)). The carried shift gives back target answers too,
    so the budget rule judges what ships."""
    out = []
    for d, f in held:
        a, b = predict_logits(shipped, d.x).float().argmax(1), f.argmax(1)
        k = f.shape[1]
        freq_a, freq_b = (torch.bincount(v, minlength=k).float() / len(v) for v in (a, b))
        out.append((float((a == b).float().mean()), float((freq_a * freq_b).sum())))
    return out


def _holdouts(model: nn.Module, source: TensorData, target: TensorData, cfg: MapConfig):
    """Mask selection's held-out slices of the defender's source (or pseudo-source) and target images, with the
    frozen model's logits on them; returns (source left to train on, held source, held target, logits)."""
    g = np.random.default_rng(cfg.seed + HOLDOUT_SEED_OFFSET)
    n_hold = min(cfg.holdout, max(1, len(source) // 10))
    perm = g.permutation(len(source))
    held_src, source = source.take(perm[:n_hold]), source.take(perm[n_hold:]) if len(source) > n_hold else source
    held_tgt = target.take(g.permutation(len(target))[: cfg.holdout])
    with torch.no_grad():
        frozen_src = predict_logits(model, held_src.x).float()
        frozen_tgt = predict_logits(model, held_tgt.x).float()
    return source, held_src, held_tgt, frozen_src, frozen_tgt


@torch.no_grad()
def _restart_at(model: nn.Module, scores: MaskScores, chosen: MaskSet, names: list[str], cfg: MapConfig) -> nn.Module:
    """The repair's start: scores at ±margin from the chosen mask; returns the chosen mask's model, whose
    target answers the repair holds."""
    held_model = copy.deepcopy(model)
    chosen.bake_(held_model)
    params = dict(model.named_parameters())
    for i, sc in enumerate(scores.scores):
        sc.copy_(initial_scores(params[names[i]].detach(), cfg.margin, getattr(scores, f"best_{i}")))
    return held_model.eval()


def _cap(d: TensorData, n: int | None, seed: int) -> TensorData:
    if n is None or len(d) <= n:
        return d
    return d.take(np.random.default_rng(seed).permutation(len(d))[:n])


def pseudo_source(model: nn.Module, data: ProtectionData, cfg: MapConfig) -> tuple[TensorData, dict]:
    """The source-free / data-free stand-in for the source: synthesised from noise, from the defender's target
    images (their content restyled to the source's feature statistics), or both sets together."""
    init = cfg.synth.init
    if init == "auto":
        init = "target" if (cfg.setting == "source-free" and data.target is not None) else "noise"
    if init in ("target", "both") and data.target is None:
        raise EdgeguardError(f"synth.init={init} needs target images; data-free has none (use noise)")
    parts = []
    synth = replace(cfg.synth, seed=cfg.synth.seed + cfg.seed)  # `--seed` reaches the synthesis too (0: as before)
    if init in ("noise", "both"):
        parts.append(cached_pseudo_source(model, data.num_classes, replace(synth, init="noise"),
                                          str(data.device)))
    if init in ("target", "both"):
        order = np.random.default_rng(cfg.seed).permutation(len(data.target))
        start = data.target.x.cpu().numpy()[order[: cfg.synth.n]]
        parts.append(cached_pseudo_source(model, data.num_classes, replace(synth, init="target"),
                                          str(data.device), init_images=start))
    xs, ys = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return TensorData.from_numpy(xs, ys), {"pseudo_source": int(len(ys)), "synth_init": init}


def run_map(model: nn.Module, data: ProtectionData, cfg: MapConfig, checkpoints: Checkpoints) -> MethodResult:
    """MAP in cfg.setting: build the source (real or pseudo) and target (real or neighbour) sets, learn the mask."""
    notes: dict = {}
    if cfg.setting == "source-available":
        source = _cap(data.source, cfg.max_source, cfg.seed)
    else:
        source, notes = pseudo_source(model, data, cfg)
    if cfg.setting == "data-free":
        neighbours = neighbour_domains(source.x.cpu().numpy(), cfg.seed)
        target = TensorData.from_numpy(neighbours, np.zeros(len(source) * NEIGHBOUR_COPIES, np.int64))
    else:
        target = _cap(data.target, cfg.max_target, cfg.seed)
    budget_rule = cfg.setting == "source-free" and cfg.sparsity_cap is None
    if budget_rule:
        cfg = replace(cfg, sparsity_cap=cfg.budget_start)
    elif cfg.setting == "data-free" and cfg.sparsity_cap is None and cfg.data_free_cap < 1:
        cfg = replace(cfg, sparsity_cap=cfg.data_free_cap)
    mask, history = learn_mask(model, source, target, cfg, cfg.setting == "source-available", data.device,
                               checkpoints, budget_rule)
    if budget_rule:
        notes["budget_rule_caps"] = sorted({row["cap"] for row in history})
    carry = cfg.setting != "source-available" and cfg.recalibrate
    protected = ship(model, mask, source if carry else None)
    if carry:
        notes["bn_recalibrated_on"] = "pseudo-source"
    return MethodResult(protected, mask, history, notes)


METHOD = register_method(
    "map", "MAP (CVPR 2024): frozen source weights, a learned binary mask; source-available, source-free, "
    "data-free", MapConfig, map_needs, run_map)
