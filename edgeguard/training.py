"""The one train/evaluate loop. Methods pass a loss function and a batch source; they never re-write loops.

Data lives on the training device as uint8 tensors; normalisation and augmentation run batched there
(a per-image PIL DataLoader is far too slow for attack sweeps). Each epoch's randomness comes from
(seed, epoch), so a run resumed from its per-epoch checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.fileio import atomic_path

from .devices import autocast, resolve_device
from .errors import EdgeguardError
from .inputspec import InputSpec
from .models.registry import input_of
from .optim_names import OPTIMIZERS, SCHEDULES
from .progress import progress

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    """Images (uint8, N×3×32×32) and labels (int64) held on one device."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_numpy(cls, x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu") -> TensorData:
        return cls(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                   torch.from_numpy(np.ascontiguousarray(y)).long().to(device))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))

    def take(self, idx: torch.Tensor | np.ndarray) -> TensorData:
        idx = torch.as_tensor(idx, device=self.x.device, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx])


def normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 images → float as the model's input says: (x·scale − mean)/std per channel."""
    c = x.shape[1]
    mean = torch.tensor(spec.mean, device=x.device).view(1, c, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, c, 1, 1)
    return (x.float() * spec.scale - mean) / std if spec.scale != 1 / 255.0 else (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2, flip: bool = False,
            crop: float = 0.0) -> torch.Tensor:
    """Batched random translation by up to `shift` pixels (zero padding), optional horizontal flip, and with
    `crop` > 0 a random resized crop (area share in [crop, 1], aspect 3/4..4/3, bilinear) for natural images."""
    n, _, h, w = x.shape
    if shift <= 0 and not flip and crop <= 0:
        return x
    gen_dev = generator.device
    theta = torch.zeros(n, 2, 3, device=gen_dev)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if flip:
        theta[:, 0, 0] = torch.where(torch.rand(n, generator=generator, device=gen_dev) < 0.5, -1.0, 1.0)
    if crop > 0:
        area = crop + (1 - crop) * torch.rand(n, generator=generator, device=gen_dev)
        ratio = torch.exp((torch.rand(n, generator=generator, device=gen_dev) * 2 - 1) * math.log(4 / 3))
        fw, fh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        centre = (torch.rand(n, 2, generator=generator, device=gen_dev) * 2 - 1) * torch.stack([1 - fw, 1 - fh], 1)
        theta[:, 0, 0] *= fw
        theta[:, 1, 1] = fh
        theta[:, 0, 2], theta[:, 1, 2] = centre[:, 0], centre[:, 1]
    if shift > 0:
        d = torch.randint(-shift, shift + 1, (n, 2), generator=generator, device=gen_dev).float()
        theta[:, 0, 2] += d[:, 0] * 2.0 / w
        theta[:, 1, 2] += d[:, 1] * 2.0 / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear" if crop > 0 else "nearest", padding_mode="zeros",
                         align_corners=False)


# torch's defaults, named once for the engines that write the updates out (stacked, unrolled)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # Adam and AdamW (RMSprop shares the eps)
RMS_ALPHA, ADAGRAD_EPS = 0.99, 1e-10  # RMSprop's smoothing, Adagrad's epsilon
WARMUP = 0.1  # the warm-up share of a warmup-cosine schedule


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based) of `total`: the one definition the
    sequential loop and the stacked engine share."""
    if schedule == "none":
        return 1.0
    s = min(step, total)
    if schedule == "warmup-cosine":
        warm = max(1, int(round(WARMUP * total)))
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    return 0.5 * (1 + math.cos(math.pi * s / total))


@dataclass
class TrainConfig:
    """A training recipe. Defaults are the source-model recipe (`edgeguard train`)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # adam | adamw | sgd | rmsprop | adagrad (torch's rules and defaults)
    momentum: float = 0.9
    scheduler: str = "cosine"  # cosine | warmup-cosine | none
    augment_shift: int = 2
    augment_flip: bool = False
    augment_crop: float = 0.0  # > 0: random resized crop with this minimum area share (natural images)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = False  # NHWC activations (faster for convs on CPU and GPU; set for attacks)
    cpu_bf16: bool = False  # bf16 autocast on CPU too (attacks, where the scratch baseline shares it)

    def validate(self) -> None:
        if self.epochs < 0:
            raise EdgeguardError(f"epochs must be ≥ 0, got {self.epochs}")
        if self.batch_size < 1:
            raise EdgeguardError(f"batch size must be ≥ 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EdgeguardError(f"learning rate must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise EdgeguardError(f"weight decay must be ≥ 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise EdgeguardError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULES:
            raise EdgeguardError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.scheduler!r}")


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise EdgeguardError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(seed * 100_003 + epoch)
    return g


def iterate_batches(data: TensorData, batch_size: int, generator: torch.Generator,
                    shuffle: bool = True, drop_last: bool = False) -> Iterator[TensorData]:
    n = len(data)
    order = (torch.randperm(n, generator=generator, device=generator.device).to(data.x.device)
             if shuffle else torch.arange(n, device=data.x.device))
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield TensorData(data.x[idx], data.y[idx])


def paired_batches(first: TensorData, second: TensorData, generator: torch.Generator, steps: int,
                   first_batch: int, second_batch: int | None = None, equal_size: bool = False
                   ) -> Iterator[tuple[TensorData, TensorData]]:
    """`steps` pairs (a batch of `first`, a batch of `second`), each side reshuffled whenever it runs out.

    The one way methods pair a source batch with a target batch. Shuffles are drawn lazily from `generator`
    (first's before second's), so a run is reproducible from (seed, epoch). `equal_size` trims both batches
    of a pair to the smaller one (losses that compare the two domains sample for sample).
    """
    second_batch = second_batch or first_batch
    its = [iterate_batches(first, first_batch, generator), iterate_batches(second, second_batch, generator)]
    sources = ((first, first_batch), (second, second_batch))
    for _ in range(steps):
        pair = []
        for i, (data, size) in enumerate(sources):
            b = next(its[i], None)
            if b is None:
                its[i] = iterate_batches(data, size, generator)
                b = next(its[i])
            pair.append(b)
        a, b = pair
        if equal_size:
            n = min(len(a), len(b))
            a, b = TensorData(a.x[:n], a.y[:n]), TensorData(b.x[:n], b.y[:n])
        yield a, b


def inner_recipe(epochs: int, lr: float, batch_size: int, seed: int, device: str | torch.device,
                 weight_decay: float = 0.0, scheduler: str = "none", augment_shift: int = 0) -> TrainConfig:
    """A recipe for a loop inside a method. `run_loop` steps augment their own batches (shift 0 here);
    `train_classifier` augments by the recipe's `augment_shift`."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       scheduler=scheduler, seed=seed, device=str(device), augment_shift=augment_shift)


@dataclass
class LoopState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_at: int = 0  # the epoch a resumed run started from (0: a fresh run)


# A step receives the batch and returns (loss, metrics). The batch source yields whatever the step expects.
StepFn = Callable[[object], tuple[torch.Tensor, dict[str, float]]]
BatchFn = Callable[[int, torch.Generator], Iterator[object]]


def run_loop(
    modules: dict[str, nn.Module],
    params,
    cfg: TrainConfig,
    batches: BatchFn,
    step: StepFn,
    *,
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[], None] | None = None,
    end_of_epoch: Callable[[int], dict[str, float]] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    desc: str = "train",
    steps_per_epoch: int | None = None,
    observe: Callable[[int], None] | None = None,
) -> LoopState:
    """Run `cfg.epochs` epochs of `step` over `batches(epoch, generator)`, optimising `params`.

    `modules` are saved in the per-epoch checkpoint (with the optimiser) and restored on `resume`.
    `before_step` runs after backward, before the optimiser step (e.g. mask gradients);
    `after_step` after it (e.g. re-zero pruned weights). `observe(t)` sees the weights before step t and,
    with t = the number of steps, after the last (the hardening takes its gradients there). An empty `desc`
    draws no progress and logs nothing (runs inside another loop's bar).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    params = list(params)
    opt = make_optimizer(params, cfg)
    total_steps = max(1, cfg.epochs * (steps_per_epoch or 1))
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.scheduler, s, total_steps))
             if cfg.scheduler != "none" and steps_per_epoch else None)
    state = LoopState()
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and resume and ckpt.exists():
        state = load_checkpoint(ckpt, modules, opt, sched, cfg)
        state.resumed_at = state.epoch
        log.info("resumed %s at epoch %d", ckpt, state.epoch)
    taken = 0  # optimizer steps taken by this call
    for epoch in range(state.epoch, cfg.epochs):
        for m in modules.values():
            m.train()
        gen = epoch_generator(cfg.seed, epoch, device)
        sums: dict[str, float] = {}
        count = 0
        bar = (progress(batches(epoch, gen), desc=f"{desc} {epoch + 1}/{cfg.epochs}", total=steps_per_epoch)
               if desc else batches(epoch, gen))
        for batch in bar:
            if observe:
                observe(taken)
            with autocast(device, cfg.amp, cfg.cpu_bf16):
                loss, metrics = step(batch)
            if not torch.isfinite(loss):
                raise EdgeguardError(f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; "
                                     "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step:
                before_step()
            opt.step()
            if sched:
                sched.step()
            if after_step:
                after_step()
            count += 1
            taken += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if hasattr(bar, "set_postfix") and count % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        row = {"epoch": epoch + 1, **{k: v / max(count, 1) for k, v in sums.items()}}
        if end_of_epoch:
            row.update(end_of_epoch(epoch))
        state.history.append(row)
        state.epoch = epoch + 1
        if desc:
            log.info("%s epoch %d: %s", desc, epoch + 1, json.dumps(row))
        if ckpt is not None:
            save_checkpoint(ckpt, modules, opt, sched, state, cfg)
    if observe:
        observe(taken)
    return state


def _cfg_key(cfg: TrainConfig) -> str:
    d = asdict(cfg)
    d.pop("epochs")  # extending a run's epochs is allowed
    d.pop("device")
    for k in ("channels_last", "cpu_bf16"):  # engine settings added later: old checkpoints still resume
        if not d[k]:
            d.pop(k)
    return json.dumps(d, sort_keys=True)


def save_checkpoint(path: Path, modules, opt, sched, state: LoopState, cfg: TrainConfig) -> None:
    payload = {f"module.{k}": m.state_dict() for k, m in modules.items()}
    payload["optimizer"] = opt.state_dict()
    if sched is not None:
        payload["scheduler"] = sched.state_dict()
    payload["epoch"] = torch.tensor(state.epoch)
    payload["history"] = json.dumps(state.history)
    payload["config"] = _cfg_key(cfg)
    write_checkpoint(path, payload)


def write_checkpoint(path: Path, payload: dict) -> None:
    """The one writer of resumable state: tensors and strings only (read back with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, modules, opt, sched, cfg: TrainConfig) -> LoopState:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip()
        reason = ("it holds pickled objects, which edgeguard never unpickles" if "eights only load" in text
                  else text.splitlines()[0][:100] if text else type(e).__name__)
        raise EdgeguardError(f"{path}: not a readable edgeguard checkpoint ({reason}); delete it to start "
                             "over") from None
    if not isinstance(payload, dict) or payload.get("config") != _cfg_key(cfg):
        raise EdgeguardError(f"{path}: was written with another recipe; delete it or run without --resume")
    for k, m in modules.items():
        m.load_state_dict(payload[f"module.{k}"])
    opt.load_state_dict(payload["optimizer"])
    if sched is not None and "scheduler" in payload:
        sched.load_state_dict(payload["scheduler"])
    return LoopState(int(payload["epoch"]), json.loads(payload["history"]))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                   device: torch.device | None = None) -> torch.Tensor:
    """Logits (float32, on x's device) in eval mode, batched."""
    device = device or x.device
    spec = input_of(model)
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        with autocast(device):
            outs.append(model(normalize(xb, spec)).float().to(x.device))
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 1)
    return torch.cat(outs)


def evaluate(model: nn.Module, data: TensorData, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] on `data` (eval mode)."""
    if len(data) == 0:
        raise EdgeguardError("cannot evaluate on an empty set")
    device = next(model.parameters()).device
    logits = predict_logits(model, data.x, batch_size, device)
    return float((logits.argmax(1) == data.y.to(logits.device)).float().mean())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean: the knowledge-distillation term every
    distilling loop shares (T² keeps its gradient scale independent of T)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                    reduction="batchmean") * temperature * temperature


def recipe_input(x: torch.Tensor, gen: torch.Generator, cfg: TrainConfig, spec: InputSpec) -> torch.Tensor:
    """A uint8 batch as the recipe trains on it: normalised for the model's input, then augmented from the
    epoch's generator (the one definition every loop shares, so all draw the same augmentation)."""
    x = normalize(x, spec)
    if cfg.augment_shift or cfg.augment_flip or cfg.augment_crop:
        x = augment(x, gen, cfg.augment_shift, cfg.augment_flip, cfg.augment_crop)
    return x


def classification_step(model: nn.Module, cfg: TrainConfig) -> StepFn:
    """Cross-entropy on (batch, generator) items; the generator drives the batch's augmentation."""
    spec = input_of(model)

    def step(item: tuple[TensorData, torch.Generator]):
        batch, gen = item
        x = recipe_input(batch.x, gen, cfg, spec)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), batch.y)
        return loss, {"loss": float(loss.detach()),
                      "acc": float((logits.argmax(1) == batch.y).float().mean())}

    return step


def train_classifier(
    model: nn.Module,
    train: TensorData,
    cfg: TrainConfig,
    *,
    val: TensorData | None = None,
    params=None,
    mask=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    desc: str = "train",
    train_modules: dict[str, nn.Module] | None = None,
    batches: Callable[[int, torch.Generator], Iterator[TensorData]] | None = None,
    steps_per_epoch: int | None = None,
    observe: Callable[[int], None] | None = None,
) -> LoopState:
    """Supervised cross-entropy training of `model` (or only `params`) on `train`.

    With `mask` (a MaskSet), pruned weights get no gradient and are re-zeroed after every step.
    `train_modules` are the modules put in train mode and checkpointed (default: the whole model); the
    rest stays in eval mode (a linear probe keeps the frozen encoder's BatchNorm statistics). `batches(epoch,
    generator)` replaces the shuffled pass over `train` (with its `steps_per_epoch`); `observe`: `run_loop`.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train = train.to(device)
    if len(train) == 0:
        raise EdgeguardError("the training set is empty")
    mask_dev = mask.to(device) if mask is not None else None
    steps = steps_per_epoch or math.ceil(len(train) / cfg.batch_size)
    draw = batches or (lambda epoch, gen: iterate_batches(train, cfg.batch_size, gen))

    def items(epoch: int, gen: torch.Generator):
        return ((b, gen) for b in draw(epoch, gen))

    def end_of_epoch(epoch: int) -> dict[str, float]:
        return {"val_acc": evaluate(model, val)} if val is not None else {}

    if mask_dev is not None:
        mask_dev.zero_masked_(model)
    if train_modules is not None:
        model.eval()
    return run_loop(
        train_modules if train_modules is not None else {"model": model},
        params if params is not None else model.parameters(),
        cfg,
        items,
        classification_step(model, cfg),
        before_step=(lambda: mask_dev.mask_grads_(model)) if mask_dev is not None else None,
        after_step=(lambda: mask_dev.zero_masked_(model)) if mask_dev is not None else None,
        end_of_epoch=end_of_epoch if val is not None else None,
        checkpoint=checkpoint,
        resume=resume,
        desc=desc,
        steps_per_epoch=steps,
        observe=observe,
    )


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
