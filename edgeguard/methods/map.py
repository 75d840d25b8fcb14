"""MAP (MAsk Pruning, CVPR 2024), a clean-room reconstruction: frozen source weights + a learned binary mask.

What is MAP's (shared/methods/map.md §1-2): the source model is frozen; only a target-specific binary mask is
learned, so that the masked model keeps the authorised (source) domain and loses the unauthorised (target)
one; three settings: source-available, source-free (pseudo-source data), data-free (pseudo-source and
"neighbour domains").

What is OUR design (the paper's recipe was not available to us):
- the mask: one real score per conv/linear weight (BN and biases frozen, unmasked), hard threshold
  m = 1[S ≥ 0] in the forward pass with a straight-through gradient; scores start at +margin, so the mask
  starts all-ones and the model starts exactly as the source model;
- optional sparsity cap (global or per layer: at most that fraction pruned) and a `2:4` structure (keep the
  2 highest-scoring of every 4 consecutive input weights, AND the learned threshold);
- BatchNorm stays in eval mode with the source model's running statistics throughout (the masked model is
  deployed with exactly these statistics);
- losses: source term = KL distillation from the frozen model (temperature T) + CE when labels exist;
  target term (bounded, no target labels) = −min(KL(p_frozen ‖ p), clip) (push away from the frozen
  model's answers, clipped at 3) plus optionally KL(U ‖ p) (towards uniform; off by default: measured on
  MNIST→USPS it flattens the outputs but keeps their ranking, so target accuracy rose) and optionally
  CE towards (frozen answer + 1) mod K (`tgt_shift`, off by default: 7.5 % target accuracy but 3–5 points of
  source accuracy lost on MNIST→USPS);
  also optionally log K − H(batch-mean target answer) (`tgt_balance`, off: spreading the answers evenly gave
  some of them their right class back, 39 % target accuracy on MNIST→USPS);
- a repair phase (`repair_epochs`, 4): after the main phase the scores restart at ±margin from the chosen
  mask and train on the source terms plus KL(chosen mask's answers ‖ p) on target images (`repair_target`);
  the selection score is kept, so the repaired mask replaces the chosen one only where it scores better.
  Measured on MNIST→USPS: source drop 0.61 → 0.43 point, target unchanged (17.9 %: every USPS image goes to
  class 0, USPS's largest class; `tgt_shift` 0.3 + repair spreads them, 15.3 % target but 0.70 point source);
- the defender's data per run is capped (20,000 source and 20,000 target images by default): an epoch is one
  pass over the target images, so an uncapped MNIST target made one run 18 minutes on a 2-core CPU;
- pseudo-source: BatchNorm-statistics inversion (methods/synthesis.py); in source-free it starts from the
  defender's target images (labels = the frozen model's answers on them), so the pseudo-source keeps digit
  content and takes on the source's BN statistics (from noise the source collapsed to 10 %; from target
  images 49 % on MNIST→USPS: better, still far from the bar); neighbour domains: strong colour, style and
  frequency perturbations of the pseudo-source.
Defaults were chosen by measurement on MNIST→USPS with small_cnn (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from runtime.fileio import atomic_write_text, sha256_file

from ..artifact import build_meta, load_artifact, save_artifact
from ..devices import resolve_device
from ..domains import get_domain
from ..errors import EdgeguardError
from ..masks import MaskSet, apply_n_m, prunable_names
from ..training import (
    TensorData,
    TrainConfig,
    augment,
    evaluate,
    iterate_batches,
    normalize,
    predict_logits,
    run_loop,
)
from .synthesis import SynthesisConfig, cached_pseudo_source, neighbour_domains

log = logging.getLogger(__name__)
SETTINGS = ("source-available", "source-free", "data-free")


@dataclass
class MapConfig:
    setting: str = "source-available"
    layers: str = "all"  # all | encoder | head
    sparsity: float | None = None  # cap: at most this fraction pruned
    budget: str = "global"  # global | layer (how the cap is applied)
    structure: str | None = None  # None or "2:4"
    epochs: int = 12
    batch_size: int = 128
    source_batch_ratio: int = 1  # source images per target image in each step (a steadier source gradient)
    lr: float = 0.01
    scheduler: str = "none"  # none | cosine (score learning rate)
    margin: float = 0.1
    temperature: float = 2.0
    src_kl: float = 1.0
    src_ce: float = 1.0  # only where source labels exist
    src_feat: float = 0.0  # MSE between masked and frozen pooled encoder features on source images
    select_source_weight: float = 10.0  # mask selection: 10·(1 − source agreement) + target agreement
    tgt_uniform: float = 0.0  # measured: alone it flattens target outputs but keeps their ranking
    tgt_away: float = 1.0
    tgt_shift: float = 0.0  # CE towards (frozen argmax + 1) mod K: spreads target answers over wrong classes
    tgt_balance: float = 0.0  # log K − H(batch-mean target prediction): stops the target collapsing onto one class
    clip: float = 3.0
    repair_epochs: int = 4  # after the main phase: source terms + hold the target answers, weights may regrow
    repair_target: float = 1.0
    max_source: int | None = 20000  # defender's source images per run (source-available)
    max_target: int | None = 20000  # defender's target images per run (an epoch is one pass over them)
    synth: SynthesisConfig = field(default_factory=SynthesisConfig)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise EdgeguardError(f"--setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise EdgeguardError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.budget not in ("global", "layer"):
            raise EdgeguardError(f"--budget must be global or layer, got {self.budget!r}")
        if self.structure not in (None, "2:4"):
            raise EdgeguardError(f"--structure supports only 2:4, got {self.structure!r}")
        if self.synth.init not in ("auto", "noise", "target"):
            raise EdgeguardError(f"synth init must be auto, noise or target, got {self.synth.init!r}")
        if self.scheduler not in ("none", "cosine"):
            raise EdgeguardError(f"scheduler must be none or cosine, got {self.scheduler!r}")
        if min(self.tgt_away, self.tgt_uniform, self.tgt_shift, self.tgt_balance, self.src_kl, self.src_ce,
               self.repair_target, self.repair_epochs) < 0:
            raise EdgeguardError("loss coefficients must be ≥ 0 (the signs are built into the losses)")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise EdgeguardError("epochs, batch size and learning rate must be positive")


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

    def keep(self) -> list[torch.Tensor]:
        """Hard keep-decisions (bool) per layer."""
        ss = [s.detach() for s in self.scores]
        keeps = [s >= 0 for s in ss]
        if self.cfg.structure == "2:4":
            keeps = [k & apply_n_m(s, 2, 4) if s.dim() > 1 else k for k, s in zip(keeps, ss)]
        if self.cfg.sparsity is not None:
            caps = self._cap_thresholds(ss)
            keeps = [k | (s >= t) for k, s, t in zip(keeps, ss, caps)]
            if self.cfg.structure == "2:4":
                keeps = [k & apply_n_m(s, 2, 4) if s.dim() > 1 else k for k, s in zip(keeps, ss)]
        return keeps

    def _cap_thresholds(self, ss: list[torch.Tensor]) -> list[torch.Tensor]:
        q = self.cfg.sparsity
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
    params = dict(model.named_parameters())
    subst = {n: params[n] * m for n, m in zip(scores.names, scores.soft_masks())}
    return functional_call(model, subst, (x,))


def source_loss(student_s, teacher_s, y_s, cfg: MapConfig, has_labels: bool):
    """T²·KL(frozen ‖ masked) on source images, + CE where source labels exist."""
    T = cfg.temperature
    kl_s = F.kl_div(F.log_softmax(student_s / T, 1), F.softmax(teacher_s / T, 1), reduction="batchmean") * T * T
    loss = cfg.src_kl * kl_s
    metrics = {"src_kl": float(kl_s.detach())}
    if has_labels and cfg.src_ce:
        ce = F.cross_entropy(student_s, y_s)
        loss = loss + cfg.src_ce * ce
        metrics["src_ce"] = float(ce.detach())
    return loss, metrics


def repair_losses(student_s, teacher_s, y_s, student_t, protected_t, cfg: MapConfig, has_labels: bool):
    """Repair phase: the source terms, and KL(protected ‖ masked) on target images, which holds the target
    answers of the mask chosen in the main phase while weights the source needs may grow back."""
    loss, metrics = source_loss(student_s, teacher_s, y_s, cfg, has_labels)
    keep = F.kl_div(F.log_softmax(student_t, 1), F.softmax(protected_t, 1), reduction="batchmean")
    metrics["tgt_keep_kl"] = float(keep.detach())
    return loss + cfg.repair_target * keep, metrics


def map_losses(student_s, teacher_s, y_s, student_t, teacher_t, cfg: MapConfig, has_labels: bool):
    loss, metrics = source_loss(student_s, teacher_s, y_s, cfg, has_labels)
    logp_t = F.log_softmax(student_t, 1)
    k = student_t.shape[1]
    kl_u = (-logp_t.mean(1) - math.log(k)).mean()  # KL(U ‖ p) ≥ 0
    p_teach = F.softmax(teacher_t, 1)
    kl_away = (p_teach * (torch.log(p_teach + 1e-12) - logp_t)).sum(1)  # per sample, clipped per sample:
    loss = loss + cfg.tgt_uniform * kl_u - cfg.tgt_away * torch.clamp(kl_away, max=cfg.clip).mean()
    metrics.update(tgt_kl_uniform=float(kl_u.detach()), tgt_kl_away=float(kl_away.mean().detach()))
    if cfg.tgt_balance:  # bounded in [0, log K]: 0 when the batch's target answers are spread evenly
        p_mean = logp_t.exp().mean(0)
        gap = math.log(k) + (p_mean * torch.log(p_mean + 1e-12)).sum()
        loss = loss + cfg.tgt_balance * gap
        metrics["tgt_balance_gap"] = float(gap.detach())
    if cfg.tgt_shift:  # a derangement of the frozen model's own answers (no labels); bounded below by 0
        shifted = (teacher_t.argmax(1) + 1) % k
        ce_shift = F.cross_entropy(student_t, shifted)
        loss = loss + cfg.tgt_shift * ce_shift
        metrics["tgt_shift_ce"] = float(ce_shift.detach())
    return loss, metrics


def learn_mask(model: nn.Module, source: TensorData, target: TensorData, cfg: MapConfig, has_labels: bool,
               checkpoint: str | os.PathLike | None = None, resume: bool = False) -> tuple[MaskSet, list]:
    """Learn the mask on (source, target) batches; the model's weights never change."""
    cfg.validate()
    dev = resolve_device(cfg.device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = prunable_names(model, cfg.layers)
    scores = MaskScores(model, names, cfg).to(dev)
    source, target = source.to(dev), target.to(dev)
    # Mask selection: a held-out slice of the defender's source (or pseudo-source) images and a slice of the
    # (unlabelled) target images. Each epoch's hard mask is scored by how often it agrees with the frozen
    # model there; the best epoch's mask is kept (the hard mask flips often, the last one is not the best).
    g = np.random.default_rng(cfg.seed + 17)
    n_hold = min(1000, max(1, len(source) // 10))
    perm = g.permutation(len(source))
    held_src, source = source.take(perm[:n_hold]), source.take(perm[n_hold:]) if len(source) > n_hold else source
    held_tgt = target.take(g.permutation(len(target))[:1000])
    with torch.no_grad():
        frozen_src = predict_logits(model, held_src.x).argmax(1)
        frozen_tgt = predict_logits(model, held_tgt.x).argmax(1)
    for i, k in enumerate(scores.keep()):  # the best mask so far, checkpointed with the scores
        scores.register_buffer(f"best_{i}", k.clone())
    scores.register_buffer("best_score", torch.tensor(float("inf"), device=dev))
    steps = math.ceil(len(target) / cfg.batch_size)  # an epoch is one pass over the target set
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                       scheduler=cfg.scheduler, seed=cfg.seed, device=str(dev), augment_shift=0)

    def batches(epoch: int, gen: torch.Generator):
        sb = cfg.batch_size * cfg.source_batch_ratio
        src_it = iterate_batches(source, sb, gen)
        tgt_it = iterate_batches(target, cfg.batch_size, gen)
        for _ in range(steps):
            try:
                s = next(src_it)
            except StopIteration:
                src_it = iterate_batches(source, sb, gen)
                s = next(src_it)
            try:
                t = next(tgt_it)
            except StopIteration:
                tgt_it = iterate_batches(target, cfg.batch_size, gen)
                t = next(tgt_it)
            yield s, t, gen

    protected: dict[str, nn.Module] = {}  # the main phase's masked model, during the repair phase

    def step(item):
        s, t, gen = item
        xs = augment(normalize(s.x), gen, 1)
        xt = augment(normalize(t.x), gen, 1)
        x = torch.cat([xs, xt])  # BN is in eval mode, so one pass over both domains is exact
        n = len(xs)
        feats: list[torch.Tensor] = []
        hook = model.encoder.register_forward_hook(lambda m, i, o: feats.append(o.mean(dim=(2, 3)).float()))
        try:
            with torch.no_grad():
                teach = model(x).float()
                held = protected["model"](xt).float() if protected else None
            stud = masked_forward(model, scores, x).float()
        finally:
            hook.remove()
        if held is None:
            loss, metrics = map_losses(stud[:n], teach[:n], s.y, stud[n:], teach[n:], cfg, has_labels)
        else:
            loss, metrics = repair_losses(stud[:n], teach[:n], s.y, stud[n:], held, cfg, has_labels)
        if cfg.src_feat:
            feat = F.mse_loss(feats[1][:n], feats[0][:n])
            loss = loss + cfg.src_feat * feat
            metrics["src_feat"] = float(feat.detach())

        return loss, metrics

    def agreement(data: TensorData, reference: torch.Tensor) -> float:
        with torch.no_grad():
            preds = torch.cat([masked_forward(model, scores, normalize(data.x[i : i + 512])).argmax(1)
                               for i in range(0, len(data), 512)])
        return float((preds == reference).float().mean())

    def end_of_epoch(epoch: int) -> dict[str, float]:
        ms = scores.maskset()
        src_agree, tgt_agree = agreement(held_src, frozen_src), agreement(held_tgt, frozen_tgt)
        score = cfg.select_source_weight * (1 - src_agree) + tgt_agree
        if score < float(scores.best_score):
            scores.best_score.fill_(score)
            for i, k in enumerate(scores.keep()):
                getattr(scores, f"best_{i}").copy_(k)
        return {"sparsity": ms.sparsity(), "heldout_source_agreement": src_agree,
                "target_agreement": tgt_agree, "selection_score": score}

    state = run_loop({"scores": scores}, scores.parameters(), tcfg, batches, step, end_of_epoch=end_of_epoch,
                     checkpoint=checkpoint, resume=resume, desc=f"MAP {cfg.setting}", steps_per_epoch=steps)
    history = state.history

    def chosen() -> MaskSet:  # the best mask so far (kept in the scores' buffers, so it is checkpointed)
        return MaskSet({n: getattr(scores, f"best_{i}").clone() for i, n in enumerate(names)})

    if cfg.repair_epochs:
        # Repair: restart the scores at ±margin from the chosen mask and train with the source terms while the
        # target answers are held at the chosen mask's; the selection score is kept, so a repaired mask
        # replaces the chosen one only where it scores better.
        held_model = copy.deepcopy(model)
        chosen().bake_(held_model)
        protected["model"] = held_model.eval()
        with torch.no_grad():
            params = dict(model.named_parameters())
            for i, sc in enumerate(scores.scores):
                sc.copy_(initial_scores(params[names[i]].detach(), cfg.margin, getattr(scores, f"best_{i}")))
        rcfg = TrainConfig(epochs=cfg.repair_epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                           scheduler=cfg.scheduler, seed=cfg.seed + 1, device=str(dev), augment_shift=0)
        rstate = run_loop({"scores": scores}, scores.parameters(), rcfg, batches, step, end_of_epoch=end_of_epoch,
                          checkpoint=repair_checkpoint(checkpoint) if checkpoint else None, resume=resume,
                          desc=f"MAP {cfg.setting} repair", steps_per_epoch=steps)
        history = history + [{**row, "phase": "repair"} for row in rstate.history]
    return chosen().cpu(), history


def repair_checkpoint(checkpoint: str | os.PathLike) -> Path:
    return Path(str(checkpoint) + ".repair")


def _cap(d: TensorData, n: int | None, seed: int) -> TensorData:
    if n is None or len(d) <= n:
        return d
    idx = np.random.default_rng(seed).permutation(len(d))[:n]
    return d.take(idx)


def protect_map(source_model: str | os.PathLike, target: str | None, out: str | os.PathLike,
                cfg: MapConfig | None = None, data_root: str | None = None, resume: bool = False) -> dict:
    """Run MAP in cfg.setting and write the protected artifact; returns the summary (also in the metadata)."""
    cfg = cfg or MapConfig()
    cfg.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise EdgeguardError(f"--out {out}: the model file must end in .safetensors")
    dev = resolve_device(cfg.device)
    art = load_artifact(source_model, dev)
    if art.mask is not None and art.meta.get("method") not in (None, "none"):
        raise EdgeguardError(f"{source_model}: already protected ({art.meta['method']}); start from the source model")
    model = art.model
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    src_name = art.meta["source_domain"]
    if cfg.setting != "data-free" and not target:
        raise EdgeguardError(f"--setting {cfg.setting} needs --target DOMAIN (the unauthorised domain)")
    tgt_dom = get_domain(target, data_root) if target else None
    if tgt_dom is not None and tgt_dom.num_classes != art.meta["num_classes"]:
        raise EdgeguardError(f"target {target} has {tgt_dom.num_classes} classes, the model "
                             f"{art.meta['num_classes']}")
    synth_history: dict = {}
    if cfg.setting == "source-available":
        src_dom = get_domain(src_name, data_root)
        source = _cap(TensorData.from_numpy(src_dom.train_x, src_dom.train_y), cfg.max_source, cfg.seed)
        has_labels = True
    else:
        init = None
        if cfg.synth.init == "target" or (cfg.synth.init == "auto" and tgt_dom is not None
                                          and cfg.setting == "source-free"):
            if tgt_dom is None:
                raise EdgeguardError("synth init 'target' needs --target images; data-free has none (use noise)")
            order = np.random.default_rng(cfg.seed).permutation(len(tgt_dom.train_x))
            init = tgt_dom.train_x[order[: cfg.synth.n]]
        xs, ys = cached_pseudo_source(model, art.meta["num_classes"], cfg.synth, str(dev), init_images=init)
        source = TensorData.from_numpy(xs, ys)
        has_labels = False  # pseudo-labels are the model's own: distillation only
        synth_history = {"pseudo_source": int(len(ys)), "synth_init": "target" if init is not None else "noise"}
    if cfg.setting == "data-free":
        target_train = TensorData.from_numpy(neighbour_domains(source.x.cpu().numpy(), cfg.seed),
                                             np.zeros(len(source) * 7, np.int64))
    else:
        target_train = _cap(TensorData.from_numpy(tgt_dom.train_x, np.zeros(len(tgt_dom.train_y), np.int64)),
                            cfg.max_target, cfg.seed)  # labels zeroed: MAP never reads target labels
    ckpt = out.with_name(out.name + ".ckpt")
    mask, history = learn_mask(model, source, target_train, cfg, has_labels, checkpoint=ckpt, resume=resume)
    seconds = time.perf_counter() - t0

    accs = _before_after(model, mask, src_name, target, data_root, dev)
    protected = load_artifact(source_model, dev).model
    mask.to(dev).bake_(protected)
    summary = {"setting": cfg.setting, "seconds": round(seconds, 2), "sparsity": mask.sparsity(), **accs}
    method_cfg = {**asdict(cfg), "synth": asdict(cfg.synth), "losses": {
        "source": "T²·KL(p_frozen^T ‖ p^T)" + (" + CE" if has_labels else ""),
        "target": " + ".join(t for c, t in ((cfg.tgt_uniform, f"{cfg.tgt_uniform}·KL(U ‖ p)"),
                                             (cfg.tgt_away, f"−{cfg.tgt_away}·min(KL(p_frozen ‖ p), {cfg.clip})"),
                                             (cfg.tgt_shift, f"{cfg.tgt_shift}·CE(p, argmax p_frozen + 1)"),
                                             (cfg.tgt_balance, f"{cfg.tgt_balance}·(log K − H(mean p))"))
                             if c) or "none"}}
    meta = build_meta(protected, arch=art.meta["arch"], classes=art.meta["classes"], source_domain=src_name,
                      method="map", method_config=method_cfg, arch_args=art.meta.get("arch_args"),
                      target_domains=[target] if target else [], accuracies=accs,
                      extra={"protection": {"history": history, "seconds": round(seconds, 2), **synth_history,
                                            "source_model_sha256": sha256_file(source_model)}})
    save_artifact(out, protected.cpu(), meta, mask)
    atomic_write_text(out.with_name(out.name + ".config.json"), json.dumps(method_cfg, indent=2, default=str))
    ckpt.unlink(missing_ok=True)
    repair_checkpoint(ckpt).unlink(missing_ok=True)
    return summary



def _before_after(model: nn.Module, mask: MaskSet, src_name: str, target: str | None, data_root, dev) -> dict:
    """Source and target test accuracy of the frozen model and of the masked one (where the data exists)."""
    masked = copy.deepcopy(model)
    mask.to(dev).bake_(masked)
    accs: dict[str, float] = {}
    for role, name in (("source", src_name), ("target", target)):
        if not name:
            continue
        try:
            d = get_domain(name, data_root)
        except EdgeguardError:
            continue
        test = TensorData.from_numpy(d.test_x, d.test_y, dev)
        suffix = "" if role == "source" else f":{name}"
        accs[f"{role}_before{suffix}"] = evaluate(model, test)
        accs[f"{role}_after{suffix}"] = evaluate(masked, test)
    return accs
