"""Pseudo-data from a frozen model, for MAP's source-free and data-free settings.

- `synthesize`: the pseudo-source by DeepInversion (`synthesize_deepinversion`: optimise each batch's pixels
  so that every BatchNorm layer's batch statistics match its running ones, with CE to sampled labels, image
  priors, per-step translation, a half-resolution start and the Adaptive DeepInversion competition with a
  student distilled on the earlier batches, which wins on grey and colour sources alike, and per-image colour
  jitter where the model ignores colour (it wins on a colour source and loses on a grey one, and the model's own
  answers tell the two apart); as a setting, relabelling of restyled target images after restyling). Then an optional class-balanced confidence
  filter (a generator recipe was measured and removed: RESULTS, "MAP without source data (issue 20)"). Models
  without BatchNorm get a clear error (the statistics are the only trace of the source data they keep).
- `neighbour_domains`: "neighbour domains" made from pseudo-source images by strong style, colour and
  frequency perturbations (the data-free stand-in for an unknown target).
Synthesised sets are cached on disk keyed by the model's weights and the recipe, and are stored as uint8
like every other domain here. This is our design (shared/methods/map.md §7.5): MAP's recipe is not known;
the measurements that chose the defaults: benchmarks/RESULTS.md, "Pseudo-source fidelity".
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.fileio import atomic_path

from ..bn_stats import BNStatHook, bn_distance, bn_layers  # noqa: F401  (bn_distance: re-exported)
from ..cache import cache_dir as cache_root
from ..config import param
from ..devices import resolve_device
from ..errors import EdgeguardError
from ..inputspec import DIGITS_INPUT, InputSpec
from ..models.registry import create_model, input_of, list_models
from ..progress import progress
from ..training import augment, distillation_loss, normalize

RECIPES = ("deepinversion",)  # the generator recipe lost (fidelity 59.1 % against 93.9 %) and was removed


@dataclass(frozen=True)
class SynthesisConfig:
    """How the pseudo-source is made from the frozen model (MAP source-free and data-free)."""

    recipe: str = param("deepinversion", "deepinversion: optimise the pixels of each batch", choices=RECIPES)
    n: int = param(1024, "pseudo-source images to keep")
    batch_size: int = param(128, "images optimised together (with competition: several batches, the student "
                            "learns from the earlier ones)")
    iterations: int = param(200, "Adam steps per batch")
    lr: float = param(0.1, "Adam learning rate on the pixels")
    bn_weight: float = param(1.0, "weight of the BatchNorm-statistics match")
    first_bn_weight: float = param(10.0, "extra factor on the first BatchNorm layer's match (the colour and "
                                   "stroke statistics)")
    ce_weight: float = param(1.0, "weight of the CE towards the sampled (or the model's own) labels")
    tv_weight: float = param(5e-3, "total-variation smoothness prior")
    l2_weight: float = param(1e-4, "L2 prior on the pixels")
    jitter: int = param(2, "random translation (pixels, wrap-around) of the images at every step")
    flip: bool = param(False, "random horizontal flips at every step (for mirror-symmetric classes only)")
    lowres: float = param(0.5, "share of the iterations optimised at half resolution first (multi-resolution)")
    colour: float = param(0.2, "per-image brightness and per-channel offset jitter at every step (strength, in "
                          "normalised units; 0 = off), used only where the model ignores it (colour_agreement)")
    colour_agreement: float = param(0.85, "colour jitter joins from the second batch on only if the model's answers "
                                    "on the first batch survive it this often (0 = from the start, whatever the "
                                    "model; grey-digit and colour models measured apart: RESULTS)")
    competition: float = param(1.0, "Adaptive DeepInversion: weight of the teacher–student disagreement term "
                               "(a student distilled on the batches made so far; 0 = off, plain DeepInversion)")
    student_steps: int = param(100, "student distillation steps after each batch (competition only)")
    relabel: float = param(0.0, "images started from target images: share of the iterations restyled without "
                           "CE before their labels are read from the restyled images (0: the model's answers on "
                           "the raw start, which a model weak on the target gives to few classes)")
    oversample: float = param(1.0, "make this many times n and keep the most confident n/K per class")
    seed: int = param(0, "seed of the noise start and the sampled labels")
    init: str = param("auto", "start from noise, from the defender's target images, both (the two sets "
                        "together), or auto (target where there are some)", choices=("auto", "noise", "target", "both"))

    def low_iterations(self) -> int:
        """Steps of each batch at half resolution (multi-resolution start); 0 = full resolution throughout."""
        return int(round(self.lowres * self.iterations))

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise EdgeguardError(f"synth.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if min(self.n, self.batch_size, self.iterations) < 1 or not self.lr > 0:
            raise EdgeguardError("synth.n, synth.batch_size, synth.iterations and synth.lr must be positive")
        if min(self.bn_weight, self.first_bn_weight, self.ce_weight, self.tv_weight, self.l2_weight,
               self.jitter) < 0:
            raise EdgeguardError("synth weights and synth.jitter must be ≥ 0")
        if not 0 <= self.colour_agreement <= 1:
            raise EdgeguardError(f"synth.colour_agreement is a share in [0, 1], got {self.colour_agreement}")
        if min(self.colour, self.competition) < 0 or self.student_steps < 1:
            raise EdgeguardError("synth.colour and synth.competition must be ≥ 0 and synth.student_steps ≥ 1")
        if not 0 <= self.relabel < 1:
            raise EdgeguardError(f"synth.relabel is a share of the iterations in [0, 1), got {self.relabel}")
        if not 0 <= self.lowres < 1:
            raise EdgeguardError(f"synth.lowres is a share of the iterations in [0, 1), got {self.lowres}")
        if not self.oversample >= 1:
            raise EdgeguardError(f"synth.oversample must be ≥ 1, got {self.oversample}")


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def _stats(spec: InputSpec, dev) -> tuple[torch.Tensor, torch.Tensor]:
    c = spec.shape[0]
    return (torch.tensor(spec.mean, device=dev).view(1, c, 1, 1), torch.tensor(spec.std, device=dev).view(1, c, 1, 1))


def _to_uint8(x_norm: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean, std = _stats(spec, x_norm.device)
    return ((x_norm * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _pixel_range(dev: torch.device, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = _stats(spec, dev)
    return (0 - mean) / std, (1 - mean) / std


def _perturb(x: torch.Tensor, cfg: SynthesisConfig, gen: torch.Generator) -> torch.Tensor:
    """The per-step views of DeepInversion: per-image colour jitter, a wrap-around roll, an optional flip."""
    if cfg.colour > 0:
        n = x.shape[0]
        gain = 1 + cfg.colour * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
        bias = cfg.colour * (torch.rand(n, x.shape[1], 1, 1, generator=gen) * 2 - 1)
        x = x * gain.to(x.device) + bias.to(x.device)
    if cfg.jitter:
        dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if cfg.flip and bool(torch.rand(1, generator=gen) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


def _frozen(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model in eval mode without gradients, and its BN layers (refused without any)."""
    layers = bn_layers(model)
    if not layers:
        raise EdgeguardError("source-free and data-free MAP synthesise pseudo-source images from BatchNorm "
                             "statistics, and this model has no BatchNorm layer; use --setting source-available")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return layers


def _balanced_labels(size: int, offset: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    y = (torch.arange(size) + offset) % num_classes
    return y[torch.randperm(size, generator=gen)]


def _js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence between the softmaxes of two logit batches (mean over the batch)."""
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    m = ((p + q) / 2).clamp_min(1e-8).log()
    return 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))


def _competition_student(model: nn.Module, num_classes: int, cfg: SynthesisConfig, dev) -> nn.Module:
    """A fresh model of the teacher's architecture, seeded by cfg.seed with the global RNG left alone: the
    registry's for a registered one, else (an imported model) a copy with every layer's parameters reset."""
    arch = getattr(model, "arch", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if arch in list_models():
            student = create_model(arch, num_classes, input_of(model))
        else:
            student = copy.deepcopy(model)
            for m in student.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    student = student.to(dev).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def _distil_student(student: nn.Module, teacher: nn.Module, x_uint8: torch.Tensor, steps: int, spec: InputSpec,
                    gen: torch.Generator) -> None:
    """A few KD steps (T = 4) of the competition student on the images made so far."""
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    dev = next(student.parameters()).device
    for _ in range(steps):
        idx = torch.randint(0, len(x_uint8), (min(128, len(x_uint8)),), generator=gen)
        x = augment(normalize(x_uint8[idx].to(dev), spec), gen, 2)
        with torch.no_grad():
            t = teacher(x)
        loss = distillation_loss(student(x), t, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)


def _batch_start(model: nn.Module, init_images: np.ndarray | None, offset: int, size: int, num_classes: int,
                 lowres: bool, gen: torch.Generator, dev) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch's start (normalised), its labels and its width: target images with the model's answers, or
    noise (at half width for a multi-resolution start) with balanced sampled labels."""
    spec = input_of(model)
    c, full_h, full_w = spec.shape
    if init_images is not None:
        x0 = normalize(torch.from_numpy(init_images[offset : offset + size]).to(dev), spec)
        with torch.no_grad():
            return x0, model(x0).argmax(1), full_w
    y = _balanced_labels(size, offset, num_classes, gen).to(dev)
    res = full_w // 2 if lowres else full_w
    return (torch.randn(size, c, full_h * res // full_w, res, generator=gen) * 0.5).to(dev), y, res


@dataclass
class _Inversion:
    """What every batch of one synthesis run shares: the frozen model, its BN hook, the competition student,
    the pixel range, the generator, the progress ticks and the history."""

    model: nn.Module
    cfg: SynthesisConfig
    hook: BNStatHook
    student: nn.Module | None
    spec: InputSpec
    lo: torch.Tensor
    hi: torch.Tensor
    gen: torch.Generator
    ticks: object
    history: list | None


def colour_agreement(model: nn.Module, x_norm: torch.Tensor, cfg: SynthesisConfig) -> float:
    """Share of images whose frozen-model answer survives `cfg.colour` jitter (one fixed-seed draw): near 1 for a
    model that learned to ignore colour, low for one that never saw any (a grey-digit model)."""
    views = replace(cfg, jitter=0, flip=False)
    with torch.no_grad():
        plain = model(x_norm).argmax(1)
        jittered = model(_perturb(x_norm, views, torch.Generator().manual_seed(cfg.seed))).argmax(1)
    return float((plain == jittered).float().mean())


def _invert_batch(run: _Inversion, b: int, x0: torch.Tensor, y: torch.Tensor, res: int, relabel_at: int,
                  colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one batch from its start `x0` (at width `res`, lifted to full width after the low-resolution
    share) for cfg.iterations Adam steps; the images (normalised, full size) and their labels."""
    cfg, model, hook = run.cfg, run.model, run.hook
    views = cfg if colour else replace(cfg, colour=0.0)
    _, full_h, full_w = run.spec.shape
    low_iters = cfg.low_iterations()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    for i in range(cfg.iterations):
        next(run.ticks, None)
        if relabel_at and i == relabel_at:  # read the labels on the restyled images, not the raw ones
            with torch.no_grad():
                y = model(x.detach()).argmax(1)
            hook.pop()
        if res != full_w and i == low_iters:  # multi-resolution: continue at full resolution
            with torch.no_grad():
                x = F.interpolate(x.detach(), size=(full_h, full_w), mode="bilinear", align_corners=False)
            x.requires_grad_(True)
            state = opt.state_dict()["param_groups"][0]
            opt = torch.optim.Adam([x], lr=state["lr"], betas=(0.5, 0.9))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations - i)
            res = full_w
        full = x if res == full_w else F.interpolate(x, size=(full_h, full_w), mode="bilinear", align_corners=False)
        hook.pop()
        seen = _perturb(full, views, run.gen)
        logits = model(seen)
        bn = hook.pop()
        ce_weight = 0.0 if i < relabel_at else cfg.ce_weight
        loss = (ce_weight * F.cross_entropy(logits, y) + cfg.bn_weight * bn
                + cfg.tv_weight * _tv(full) + cfg.l2_weight * full.pow(2).mean())
        if run.student is not None and b > 0:  # Adaptive DeepInversion: seek what the student gets wrong
            loss = loss + cfg.competition * (1 - _js(logits, run.student(seen)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.data = torch.max(torch.min(x.data, run.hi), run.lo)
        if run.history is not None and (i % 20 == 0 or i == cfg.iterations - 1):
            run.history.append({"batch": b, "iteration": i, "bn_distance": float(bn.detach()),
                                "loss": float(loss.detach())})
    return x.detach(), y


def synthesize_deepinversion(model: nn.Module, num_classes: int, cfg: SynthesisConfig, device: str = "auto",
                             history: list | None = None, init_images: np.ndarray | None = None,
                             count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DeepInversion: optimise each batch's pixels so that every BatchNorm layer's batch statistics match its
    running ones, with CE to balanced sampled labels, TV and L2 priors, per-step translation and flip, an
    optional half-resolution start, Adam with a cosine learning rate. With `cfg.competition` a student is
    distilled on the batches made so far and each new batch also seeks the teacher–student disagreement
    (Adaptive DeepInversion), so later batches cover what earlier ones left out. Colour jitter joins the views
    from the second batch on where the model ignores it on the first (`colour_agreement`).

    With `init_images` (uint8, e.g. the defender's target images) the optimisation starts from them: the first
    `cfg.relabel` share of the steps restyles them without CE, then the frozen model's answers on the restyled
    images are their labels. The result keeps their content and takes on the source domain's feature
    statistics ("target restyled as source").
    """
    layers = _frozen(model)
    dev = resolve_device(device)
    model = model.to(dev)
    count = count or cfg.n
    xs, ys = [], []
    student = _competition_student(model, num_classes, cfg, dev) if cfg.competition > 0 else None  # before the hook
    spec = input_of(model)
    n_batches = -(-count // cfg.batch_size)
    ticks = iter(progress(range(n_batches * cfg.iterations), desc="synthesise", total=n_batches * cfg.iterations))
    run = _Inversion(model, cfg, BNStatHook(layers, cfg.first_bn_weight), student, spec, *_pixel_range(dev, spec),
                     torch.Generator(device="cpu").manual_seed(cfg.seed), ticks, history)
    colour = cfg.colour > 0 and cfg.colour_agreement == 0
    relabel_at = int(round(cfg.relabel * cfg.iterations)) if init_images is not None else 0
    try:
        for b in range(n_batches):
            size = min(cfg.batch_size, count - b * cfg.batch_size)
            x0, y, res = _batch_start(model, init_images, b * cfg.batch_size, size, num_classes,
                                      cfg.low_iterations() > 0, run.gen, dev)
            x, y = _invert_batch(run, b, x0, y, res, relabel_at, colour)
            if b == 0 and n_batches > 1 and cfg.colour > 0 and not colour:
                kept = colour_agreement(model, x, cfg)
                run.hook.pop()
                colour = kept >= cfg.colour_agreement
                if history is not None:
                    history.append({"batch": 0, "colour_agreement": kept, "colour": colour})
            xs.append(_to_uint8(x, spec).cpu())
            ys.append(y.cpu())
            if student is not None and b < n_batches - 1:
                _distil_student(student, model, torch.cat(xs), cfg.student_steps, spec, run.gen)
                run.hook.pop()  # the teacher's passes there are not a batch being made
    finally:
        run.hook.close()
    return torch.cat(xs).numpy(), torch.cat(ys).numpy().astype(np.int64)


def keep_confident(model: nn.Module, x: np.ndarray, y: np.ndarray, n: int, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced confidence filter: per class, the n/K images the frozen model is surest are that class."""
    from ..training import predict_logits

    dev = next(model.parameters()).device
    probs = F.softmax(predict_logits(model, torch.from_numpy(x), device=dev), 1).cpu().numpy()
    conf = probs[np.arange(len(y)), y]
    keep = []
    per_class = -(-n // num_classes)
    for k in range(num_classes):
        idx = np.flatnonzero(y == k)
        keep.extend(idx[np.argsort(-conf[idx], kind="stable")[:per_class]].tolist())
    keep = np.array(sorted(keep)[:n] if len(keep) > n else sorted(keep), dtype=np.int64)
    return x[keep], y[keep]


def synthesize(model: nn.Module, num_classes: int, cfg: SynthesisConfig = SynthesisConfig(),
               device: str = "auto", history: list | None = None, init_images: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-source images (uint8 N×C×H×W at the model's input) and the labels they were made for, by `cfg.recipe`."""
    cfg.validate()
    count = int(math.ceil(cfg.n * cfg.oversample)) if init_images is None else cfg.n
    x, y = synthesize_deepinversion(model, num_classes, cfg, device, history, init_images, count)
    if len(x) > cfg.n:
        x, y = keep_confident(model, x, y, cfg.n, num_classes)
    return x, y


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_path(model: nn.Module, cfg: SynthesisConfig, init_images: np.ndarray | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the pseudo-source of (model weights, recipe, init images) is kept."""
    root = Path(cache_dir) if cache_dir else cache_root("synth")
    init_key = hashlib.sha256(init_images.tobytes()).hexdigest()[:20] if init_images is not None else None
    spec = input_of(model)
    extra = {} if spec == DIGITS_INPUT else {"input": asdict(spec)}  # digits keys stay as they were
    key = hashlib.sha256(json.dumps({"m": model_fingerprint(model), **asdict(cfg), "init_images": init_key, **extra},
                                    sort_keys=True).encode())
    return root / f"{key.hexdigest()[:24]}.npz"


def cached_pseudo_source(model: nn.Module, num_classes: int, cfg: SynthesisConfig, device: str = "auto",
                         cache_dir: str | os.PathLike | None = None, init_images: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo-source, computed once per (model weights, recipe, init images) and kept on disk."""
    if init_images is not None:
        init_images = np.ascontiguousarray(init_images[: cfg.n])
        if len(init_images) < cfg.n:
            cfg = replace(cfg, n=len(init_images))
    path = cache_path(model, cfg, init_images, cache_dir)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["x"], z["y"]
        except Exception:
            path.unlink(missing_ok=True)
    x, y = synthesize(model, num_classes, cfg, device, init_images=init_images)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
    return x, y


def neighbour_domains(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Strongly perturbed copies of uint8 images: colour inversion and permutation, random tints over
    textured backgrounds, blur (low-pass) and edge (high-pass) versions, stroke thickening. One copy each."""
    rng = np.random.default_rng(seed)
    t = torch.from_numpy(x).float() / 255.0
    n = t.shape[0]
    outs = []
    outs.append(1.0 - t)  # inverted
    perm = torch.from_numpy(np.stack([rng.permutation(3) for _ in range(n)]))
    outs.append(torch.gather(t, 1, perm[:, :, None, None].expand(-1, -1, *t.shape[2:])))  # channel shuffle
    tint = torch.from_numpy(rng.uniform(0.2, 1.0, (n, 3, 1, 1))).float()
    bg = F.interpolate(torch.from_numpy(rng.uniform(0, 1, (n, 3, 4, 4))).float(), size=t.shape[2:], mode="bilinear",
                       align_corners=False)
    grey = t.mean(1, keepdim=True)
    outs.append((grey * tint + (1 - grey) * bg).clamp(0, 1))  # colour strokes over a smooth photo-like patch
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :]) / 256.0
    blur = F.conv2d(F.pad(t, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
    outs.append(blur)  # low-pass
    outs.append((0.5 + 2.0 * (t - blur)).clamp(0, 1))  # high-pass
    outs.append(F.max_pool2d(t, 3, stride=1, padding=1))  # thicker strokes, a different "pen"
    noise = torch.from_numpy(rng.normal(0, 0.15, t.shape)).float()
    outs.append((t * torch.from_numpy(rng.uniform(0.5, 1.5, (n, 1, 1, 1))).float() + noise).clamp(0, 1))
    out = torch.cat(outs)
    return (out * 255).round().to(torch.uint8).numpy()
