"""A vendor's own trained model into an edgeguard model file: `edgeguard import` and `edgeguard.import_model`.

The architecture is rebuilt from its name (torchvision, timm or `package.module:function`), the weights are
read from safetensors or `torch.load(weights_only=True)` (nothing is unpickled), the encoder/head split is
checked to reproduce the vendor's outputs, and the card records the input (size, normalisation, resize).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from runtime.fileio import sha256_file

from .card import DomainAccuracy, ModelCard
from .errors import EdgeguardError
from .inputspec import InputSpec
from .models.imported import build_module, check_split, split_module
from .models.registry import Classifier


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines ignored) or a JSON list."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeguardError(f"--classes {p}: cannot read it ({type(e).__name__}); give a text file, one class "
                             "per line") from None
    names = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines()]
    names = [str(n) for n in names if str(n).strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise EdgeguardError(f"--classes {p}: needs 2 or more distinct class names, one per line, in the "
                             "model's output order")
    return names


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file through `torch.load(weights_only=True)`: a file
    that would need unpickling of code is refused. `{"state_dict": …}`/`{"model": …}` wrappers and
    DataParallel's `module.` prefix are unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise EdgeguardError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise EdgeguardError(f"{p}: not a readable safetensors file ({e})") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
            raise EdgeguardError(f"{p}: refused: torch.load(weights_only=True) cannot read it without running "
                                 f"pickled code ({str(e).splitlines()[0][:80]}); save model.state_dict() with "
                                 "torch.save, or as safetensors") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeguardError(f"{p}: not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, arch: str) -> None:
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or extra or shapes:
        first = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra else
                 f"{shapes[0]!r} is {tuple(state[shapes[0]].shape)}, {arch} has {tuple(want[shapes[0]].shape)}")
        raise EdgeguardError(f"{where}: the weights do not fit {arch} ({len(missing)} missing, {len(extra)} "
                             f"unexpected, {len(shapes)} of another shape; {first}); check --arch and --classes")
    module.load_state_dict(state, strict=True)


def import_module(module: nn.Module, arch: str, classes: list[str], input_spec: InputSpec,
                  head: str | None = None) -> Classifier:
    """`module` (already holding its weights) as an edgeguard Classifier whose outputs are the module's own."""
    import copy

    reference = copy.deepcopy(module)
    model = split_module(module, arch, len(classes), head)
    check_split(reference, model, input_spec.shape)
    model.input_spec = input_spec
    return model


def import_model(module: nn.Module, classes: list[str], input_spec: InputSpec, arch: str, *,
                 source_domain: str, head: str | None = None) -> tuple[Classifier, ModelCard]:
    """Python entry: a trained `module` whose architecture `arch` names how to rebuild it (torchvision:NAME,
    timm:NAME or package.module:function) → (Classifier, card) ready for `save_artifact`."""
    probe = build_module(arch, len(classes))  # the name must rebuild this very module, or loading would fail
    _load_strict(probe, module.state_dict(), f"arch {arch}", arch)
    model = import_module(module, arch, list(classes), input_spec, head)
    card = ModelCard(arch=arch, classes=list(classes), source_domain=source_domain,
                     arch_args={"head": model.head_name}, input=input_spec)
    return model, card


def import_weights(weights: str | os.PathLike, arch: str, classes_file: str | os.PathLike, input_spec: InputSpec,
                   source_domain: str, out: str | os.PathLike, *, head: str | None = None,
                   data_root: str | None = None, device: str = "cpu") -> dict:
    """`edgeguard import`: rebuild, load, split, check, measure on the source test split, write."""
    from .artifact import save_artifact
    from .domains import get_domain
    from .training import TensorData, evaluate

    classes = read_classes(classes_file)
    module = build_module(arch, len(classes))
    _load_strict(module, read_weights(weights), str(weights), arch)
    model, card = import_model(module, classes, input_spec, arch, source_domain=source_domain, head=head)
    dom = get_domain(source_domain, data_root, classes=classes, role="source", input=input_spec)
    acc = evaluate(model.to(device), TensorData.from_numpy(dom.test_x, dom.test_y, device))
    encoder_layers = [n for n, m in model.encoder.named_children()]
    card.accuracies = [DomainAccuracy(source_domain, "source", acc)]
    card.training = {"imported_from": str(weights), "weights_sha256": sha256_file(weights),
                     "head": model.head_name, "encoder": encoder_layers}
    save_artifact(out, model.cpu(), card)
    return {"out": str(out), "arch": arch, "head": model.head_name, "encoder": encoder_layers,
            "classes": len(classes), "input": list(input_spec.shape), "source": source_domain,
            "source_accuracy": acc}
