"""Train a source (authorised-domain) model and write it as an artifact: `edgeguard train`."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from runtime.fileio import atomic_write_text

from .artifact import save_artifact
from .card import DomainAccuracy, ModelCard
from .devices import resolve_device
from .domains import get_domain
from .errors import EdgeguardError
from .inputspec import InputSpec
from .models import create_model
from .models.registry import default_input
from .training import TensorData, TrainConfig, evaluate, seed_everything, train_classifier

log = logging.getLogger(__name__)


def default_epochs(n_train: int) -> int:
    """About 300k images seen: 5 epochs of MNIST, 30 of the 7k-image sets (USPS, MNIST-M)."""
    return int(min(30, max(5, round(300_000 / max(n_train, 1)))))


NATURAL_MIN_SIZE = 64  # at and above this input size a source model is trained as a camera model


def augmentation(spec: InputSpec) -> dict:
    """Train-time augmentation at the input's resolution: a random resized crop and flips for camera-size
    (natural) images, the 2-pixel shift the 32-px digits were always trained with."""
    if min(spec.size) >= NATURAL_MIN_SIZE:
        return {"augment_shift": 0, "augment_flip": True, "augment_crop": 0.35}
    return {"augment_shift": 2, "augment_flip": False, "augment_crop": 0.0}


def train_source(
    arch: str,
    domain: str,
    out: str | os.PathLike,
    *,
    epochs: int | None = None,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    resume: bool = False,
    max_train: int | None = None,
    input_spec: InputSpec | None = None,
) -> dict:
    """Train `arch` on `domain` from random init at `input_spec` (default: the architecture's own input);
    write the artifact and return its summary."""
    if epochs is not None and epochs < 1:
        raise EdgeguardError(f"--epochs must be at least 1 (0 would write an untrained model), got {epochs}")
    spec = input_spec or default_input(arch)
    dom = get_domain(domain, data_root, input=spec)
    if max_train:
        dom = dom.subset(n_train=max_train)
    cfg = TrainConfig(epochs=epochs if epochs is not None else default_epochs(len(dom.train_y)),
                      batch_size=batch_size, lr=lr, seed=seed, device=device, **augmentation(spec))
    cfg.validate()
    dev = resolve_device(device)
    seed_everything(seed)
    model = create_model(arch, dom.num_classes, input_spec=spec).to(dev)
    train = TensorData.from_numpy(dom.train_x, dom.train_y, dev)
    test = TensorData.from_numpy(dom.test_x, dom.test_y, dev)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise EdgeguardError(f"--out {out}: the model file must end in .safetensors")
    ckpt = out.with_name(out.name + ".ckpt")
    t0 = time.perf_counter()
    state = train_classifier(model, train, cfg, checkpoint=ckpt, resume=resume, desc=f"{arch}/{domain}")
    seconds = time.perf_counter() - t0
    acc = evaluate(model, test)
    training = {**asdict(cfg), "device": str(dev), "seconds": round(seconds, 2), "history": state.history,
                "n_train": len(train)}
    card = ModelCard(arch=arch, classes=list(dom.classes), source_domain=domain, input=spec,
                     accuracies=[DomainAccuracy(domain, "source", acc)], training=training)
    save_artifact(out, model.cpu(), card)
    atomic_write_text(out.with_name(out.name + ".config.json"), json.dumps(training, indent=2))
    ckpt.unlink(missing_ok=True)
    return {"out": str(out), "arch": arch, "domain": domain, "test_accuracy": acc, "epochs": cfg.epochs,
            "seconds": seconds, "resumed_at": state.resumed_at,
            "images_per_second": (cfg.epochs - state.resumed_at) * len(train) / max(seconds, 1e-9)}
