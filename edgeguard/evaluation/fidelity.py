"""How good a stand-in for the source a synthesised set is, measured on the set itself (not through MAP).

- `distilled_accuracy`: the standard data-free distillation check: a fresh student of the teacher's
  architecture learns the frozen teacher's soft answers on the synthesised set alone, and is scored on the real
  source test split in eval mode;
- `bn_distance` (bn_stats.py): how far the set's per-layer feature statistics are from the teacher's
  BatchNorm running statistics;
- `class_histogram`: which classes the teacher sees in the set.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bn_stats import bn_distance
from ..errors import EdgeguardError
from ..models import create_model
from ..models.registry import input_of
from ..training import (
    TensorData,
    augment,
    distillation_loss,
    evaluate,
    inner_recipe,
    iterate_batches,
    normalize,
    predict_logits,
    run_loop,
)


@dataclass(frozen=True)
class FidelityConfig:
    """The distillation recipe of the check: fixed, so two synthesisers are compared on equal terms."""

    steps: int = 1500  # optimiser steps, whatever the set's size
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 4.0
    augment_shift: int = 2
    seed: int = 0


@dataclass
class FidelityReport:
    """What `edgeguard synthesize --report` writes to fidelity.json."""

    images: int
    teacher_source_accuracy: float
    student_source_accuracy: float
    fidelity: float  # student / teacher accuracy on the real source test split
    bn_distance: float
    teacher_confidence: float  # mean max-softmax of the teacher on the set
    class_histogram: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def class_histogram(logits: torch.Tensor, num_classes: int) -> list[int]:
    return np.bincount(logits.argmax(1).cpu().numpy(), minlength=num_classes).tolist()


def distilled_accuracy(teacher: nn.Module, images: np.ndarray, source_test: TensorData,
                       cfg: FidelityConfig = FidelityConfig(), device: str | torch.device = "cpu") -> float:
    """Real-source accuracy of a fresh student distilled from `teacher` on the uint8 `images` alone."""
    if len(images) == 0:
        raise EdgeguardError("the synthesised set is empty")
    teacher = teacher.to(device).eval()
    arch, num_classes = getattr(teacher, "arch", None), getattr(teacher, "num_classes", None)
    if arch is None:
        raise EdgeguardError("the fidelity check needs a registered architecture (a Classifier)")
    spec = input_of(teacher)
    torch.manual_seed(cfg.seed)
    student = create_model(arch, num_classes, spec).to(device)  # the teacher's input (a camera model's size)
    data = TensorData.from_numpy(images, np.zeros(len(images), np.int64), device)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    epochs = max(1, round(cfg.steps / steps_per_epoch))

    def batches(epoch: int, gen: torch.Generator):
        return ((b, gen) for b in iterate_batches(data, cfg.batch_size, gen))

    def step(item):
        b, gen = item
        x = augment(normalize(b.x, spec), gen, cfg.augment_shift)
        with torch.no_grad():
            t = teacher(x).float()
        s = student(x).float()
        kl = distillation_loss(s, t, cfg.temperature)
        return kl, {"kl": float(kl.detach())}

    rcfg = inner_recipe(epochs, cfg.lr, cfg.batch_size, cfg.seed, device, scheduler="cosine")
    run_loop({"student": student}, student.parameters(), rcfg, batches, step, desc="fidelity student",
             steps_per_epoch=steps_per_epoch)
    return evaluate(student.eval(), source_test.to(device))


def fidelity_report(teacher: nn.Module, images: np.ndarray, source_test: TensorData,
                    cfg: FidelityConfig = FidelityConfig(), device: str | torch.device = "cpu") -> FidelityReport:
    """Distilled-student accuracy, BN-statistics distance, teacher confidence and class histogram of a set."""
    t0 = time.time()
    teacher = copy.deepcopy(teacher).to(device).eval()
    x = torch.from_numpy(images).to(device)
    logits = predict_logits(teacher, x)
    teacher_acc = evaluate(teacher, source_test.to(device))
    student_acc = distilled_accuracy(teacher, images, source_test, cfg, device)
    sample = normalize(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512].to(device)],
                       input_of(teacher))
    return FidelityReport(
        images=len(images), teacher_source_accuracy=teacher_acc, student_source_accuracy=student_acc,
        fidelity=student_acc / max(teacher_acc, 1e-12), bn_distance=bn_distance(teacher, sample),
        teacher_confidence=float(F.softmax(logits, 1).max(1).values.mean()),
        class_histogram=class_histogram(logits, logits.shape[1]), seconds=time.time() - t0)


def write_synthesis_report(folder: str | os.PathLike, x: np.ndarray, y: np.ndarray, classes: list[str],
                           report: FidelityReport, config: dict) -> Path:
    """grid.png (the images by class), histogram.png (the teacher's classes on them), fidelity.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.fileio import atomic_path, atomic_write_text

    from ..figures import image_grid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(y, kind="stable")
    picks = np.concatenate([order[y[order] == k][:16] for k in range(len(classes))])  # a row per class
    image_grid(x[picks], folder / "grid.png", labels=[classes[int(v)] for v in y[picks]])
    fig, ax = plt.subplots(figsize=(max(4, len(classes) * 0.6), 3))
    ax.bar(range(len(classes)), report.class_histogram, color="#4477aa")
    ax.set_xticks(range(len(classes)), [str(c)[:8] for c in classes], rotation=45 if len(classes) > 10 else 0)
    ax.set_ylabel("images")
    ax.set_title(f"teacher's classes on {report.images} pseudo-source images\nfidelity "
                 f"{report.fidelity * 100:.1f}% (student {report.student_source_accuracy * 100:.1f}% / teacher "
                 f"{report.teacher_source_accuracy * 100:.1f}%)", fontsize=9)
    fig.tight_layout()
    with atomic_path(folder / "histogram.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    atomic_write_text(folder / "fidelity.json", json.dumps({**report.to_dict(), "synthesis": config}, indent=2))
    return folder
