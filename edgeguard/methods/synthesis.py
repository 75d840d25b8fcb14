"""Pseudo-data from a frozen model, for MAP's source-free and data-free settings.

- `synthesize_bn_inversion`: DeepInversion-style images: optimise a batch so that every BatchNorm layer's
  batch mean and variance match its running statistics, plus CE to sampled labels, a total-variation
  smoothness prior and a small L2 prior. Models without BatchNorm get a clear error (no fallback: the
  statistics are the only trace of the source data such a model keeps).
- `neighbour_domains`: "neighbour domains" made from pseudo-source images by strong style, colour and
  frequency perturbations (the data-free stand-in for an unknown target).
Synthesised sets are cached on disk keyed by the model's weights and the recipe, and are stored as uint8
like every other domain here. This is our design (shared/methods/map.md §7.5): MAP's recipe is not known.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.fileio import atomic_path

from ..config import param
from ..devices import resolve_device
from ..domains.base import MEAN, STD
from ..errors import EdgeguardError
from ..progress import progress
from ..training import normalize


@dataclass(frozen=True)
class SynthesisConfig:
    """BatchNorm-inversion recipe for the pseudo-source (MAP source-free and data-free)."""

    n: int = param(1024, "pseudo-source images to synthesise")
    batch_size: int = param(256, "images optimised together")
    iterations: int = param(200, "Adam steps per batch")
    lr: float = param(0.1, "Adam learning rate on the pixels")
    bn_weight: float = param(1.0, "weight of the BatchNorm-statistics match")
    ce_weight: float = param(1.0, "weight of the CE towards the sampled (or the model's own) labels")
    tv_weight: float = param(1e-3, "total-variation smoothness prior")
    l2_weight: float = param(1e-4, "L2 prior on the pixels")
    seed: int = param(0, "seed of the noise start and the sampled labels")
    init: str = param("auto", "start from noise, from the defender's target images, or auto (target where "
                        "there are some)", choices=("auto", "noise", "target"))

    def validate(self) -> None:
        if min(self.n, self.batch_size, self.iterations) < 1 or not self.lr > 0:
            raise EdgeguardError("synth.n, synth.batch_size, synth.iterations and synth.lr must be positive")


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]


class _BNStatHook:
    """Collects, per BN layer, the distance of the current batch's statistics from the running ones."""

    def __init__(self, layers: list[nn.BatchNorm2d]):
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bn_distance(model: nn.Module, x_normalised: torch.Tensor) -> float:
    """Sum over BN layers of ‖μ_batch − μ_run‖ + ‖σ²_batch − σ²_run‖ for a batch (eval mode, no grad)."""
    layers = bn_layers(model)
    hook = _BNStatHook(layers)
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x_normalised)
        model.train(was)
        return float(hook.pop())
    finally:
        hook.close()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def _to_uint8(x_norm: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x_norm.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_norm.device).view(1, 3, 1, 1)
    return ((x_norm * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def synthesize_bn_inversion(model: nn.Module, num_classes: int, cfg: SynthesisConfig = SynthesisConfig(),
                            device: str = "auto", history: list | None = None,
                            init_images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-source images (uint8 N×3×32×32) and the labels they were optimised towards.

    With `init_images` (uint8, e.g. the defender's target images) the optimisation starts from them and the
    labels are the frozen model's own answers on them: the result keeps their content but takes on the source
    domain's feature statistics ("target restyled as source"), which is far closer to real source images
    than inversion from noise.
    """
    layers = bn_layers(model)
    if not layers:
        raise EdgeguardError("source-free and data-free MAP synthesise pseudo-source images from BatchNorm "
                             "statistics, and this model has no BatchNorm layer; use --setting source-available")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    xs, ys = [], []
    hook = _BNStatHook(layers)
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).to(dev)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).to(dev)
    try:
        n_batches = -(-cfg.n // cfg.batch_size)
        bar = progress(range(n_batches * cfg.iterations), desc="synthesise", total=n_batches * cfg.iterations)
        it = iter(bar)
        for b in range(n_batches):
            size = min(cfg.batch_size, cfg.n - b * cfg.batch_size)
            if init_images is not None:
                chunk = torch.from_numpy(init_images[b * cfg.batch_size : b * cfg.batch_size + size]).to(dev)
                x0 = normalize(chunk)
                with torch.no_grad():
                    y = model(x0).argmax(1)
                x = x0.clone().requires_grad_(True)
            else:
                y = (torch.arange(size) + b * cfg.batch_size) % num_classes  # balanced labels
                y = y[torch.randperm(size, generator=gen)].to(dev)
                x = (torch.randn(size, 3, 32, 32, generator=gen) * 0.5).to(dev).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
            for i in range(cfg.iterations):
                next(it, None)
                hook.pop()
                logits = model(x)
                bn = hook.pop()
                loss = (cfg.ce_weight * F.cross_entropy(logits, y) + cfg.bn_weight * bn
                        + cfg.tv_weight * _tv(x) + cfg.l2_weight * x.pow(2).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.data = torch.max(torch.min(x.data, hi), lo)
                if history is not None and (i % 20 == 0 or i == cfg.iterations - 1):
                    history.append({"batch": b, "iteration": i, "bn_distance": float(bn.detach()),
                                    "loss": float(loss.detach())})
            xs.append(_to_uint8(x.detach()).cpu())
            ys.append(y.cpu())
    finally:
        hook.close()
    return torch.cat(xs).numpy(), torch.cat(ys).numpy().astype(np.int64)


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cached_pseudo_source(model: nn.Module, num_classes: int, cfg: SynthesisConfig, device: str = "auto",
                         cache_dir: str | os.PathLike | None = None, init_images: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """BN-inversion pseudo-source, computed once per (model weights, recipe, init images) and kept on disk."""
    root = Path(cache_dir or Path(os.environ.get("EDGEGUARD_CACHE", Path.home() / ".cache" / "edgeguard")) / "synth")
    if init_images is not None:
        init_images = np.ascontiguousarray(init_images[: cfg.n])
        if len(init_images) < cfg.n:
            cfg = replace(cfg, n=len(init_images))
    init_key = hashlib.sha256(init_images.tobytes()).hexdigest()[:20] if init_images is not None else None
    key = hashlib.sha256(json.dumps({"m": model_fingerprint(model), **asdict(cfg), "init_images": init_key},
                                    sort_keys=True).encode())
    path = root / f"{key.hexdigest()[:24]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["x"], z["y"]
        except Exception:
            path.unlink(missing_ok=True)
    x, y = synthesize_bn_inversion(model, num_classes, cfg, device, init_images=init_images)
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
    outs.append(torch.gather(t, 1, perm[:, :, None, None].expand(-1, -1, 32, 32)))  # channel shuffle
    tint = torch.from_numpy(rng.uniform(0.2, 1.0, (n, 3, 1, 1))).float()
    bg = F.interpolate(torch.from_numpy(rng.uniform(0, 1, (n, 3, 4, 4))).float(), size=32, mode="bilinear",
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


def image_grid(x: np.ndarray, path: str | os.PathLike, labels: list[str] | None = None, cols: int = 16,
               scale: int = 3) -> Path:
    """Write uint8 N×3×32×32 images as one PNG grid (nearest-neighbour upscaled) so a person can look; with
    `labels`, each tile's label is written under it."""
    from PIL import Image, ImageDraw

    path = Path(path)
    n = len(x)
    if n == 0:
        raise EdgeguardError("no images to draw")
    if labels is not None and len(labels) != n:
        raise EdgeguardError(f"{len(labels)} labels for {n} images")
    rows = -(-n // cols)
    tile_h = 34 * scale + (12 if labels is not None else 0)
    canvas = Image.new("RGB", (min(cols, n) * 34 * scale, rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0))).resize((32 * scale, 32 * scale),
                                                                                   Image.NEAREST)
        canvas.paste(tile, (c * 34 * scale + scale, r * tile_h + scale))
        if labels is not None:
            draw.text((c * 34 * scale + scale, r * tile_h + 33 * scale), str(labels[i])[:14], fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
