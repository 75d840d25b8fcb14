"""A vendor's own architecture: `torchvision:NAME`, `timm:NAME` or `package.module:function`, rebuilt from
that name (never unpickled) and split into encoder and head at its last Linear layer, or at the layer the
user names. The head module is replaced by an identity inside the vendor's module, which becomes the encoder,
so `head(encoder(x))` is the vendor's forward exactly when that layer is applied last (`check_split`)."""
from __future__ import annotations

import importlib
import re

import torch
from torch import nn

from ..errors import EdgeguardError
from .registry import Classifier

_MODULE_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_import_spec(name: str) -> bool:
    """`torchvision:NAME`, `timm:NAME` or `package.module:function`."""
    return name.startswith(("torchvision:", "timm:")) or bool(_MODULE_FN.match(name))


def build_module(arch: str, num_classes: int) -> nn.Module:
    """The vendor's nn.Module from its name, random init, `num_classes` outputs; one-line errors."""
    kind, _, name = arch.partition(":")
    try:
        if kind == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                raise EdgeguardError(f"--arch {arch}: torchvision has no model {name!r} (e.g. resnet18, "
                                     "mobilenet_v3_small, efficientnet_b0)")
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if kind == "timm":
            try:
                import timm
            except ImportError:
                raise EdgeguardError(f"--arch {arch} needs timm: pip install -e '.[timm]'") from None
            if not timm.is_model(name):
                raise EdgeguardError(f"--arch {arch}: timm has no model {name!r}")
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        fn = getattr(importlib.import_module(kind), name, None)
        if not callable(fn):
            raise EdgeguardError(f"--arch {arch}: {kind} has no function {name!r}")
        try:
            module = fn(num_classes=num_classes)
        except TypeError:
            module = fn()
        if not isinstance(module, nn.Module):
            raise EdgeguardError(f"--arch {arch}: {name}() returned {type(module).__name__}, not a torch nn.Module")
        return module
    except EdgeguardError:
        raise
    except ImportError as e:
        raise EdgeguardError(f"--arch {arch}: cannot import {kind!r} ({e}); is it installed?") from None
    except Exception as e:  # the vendor's builder failed: say where, in one line
        raise EdgeguardError(f"--arch {arch}: building it failed ({type(e).__name__}: {str(e)[:120]})") from None


def last_linear(module: nn.Module) -> str:
    """The name of the last nn.Linear in registration order (torchvision's and timm's classifiers)."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise EdgeguardError("the model has no nn.Linear layer to use as its head; name the head layer with --head")
    return names[-1]


def _set_submodule(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def split_module(module: nn.Module, arch: str, num_classes: int, head: str | None = None) -> Classifier:
    """encoder = `module` with its head layer replaced by an identity; head = that layer."""
    head = head or last_linear(module)
    try:
        layer = module.get_submodule(head)
    except AttributeError:
        raise EdgeguardError(f"--head {head}: the model has no such layer") from None
    if not isinstance(layer, nn.Linear):
        raise EdgeguardError(f"--head {head} is a {type(layer).__name__}; the head must be an nn.Linear")
    if layer.out_features != num_classes:
        raise EdgeguardError(f"the head {head} has {layer.out_features} outputs but the class list has {num_classes} "
                             "classes; give the classes file the model was trained with")
    _set_submodule(module, head, nn.Identity())
    model = Classifier(module, layer, arch, num_classes)
    model.head_name = head
    return model


def build_imported(arch: str, num_classes: int, head: str | None = None) -> Classifier:
    """Rebuild an imported architecture (the card's arch and arch_args) for loading its weights."""
    return split_module(build_module(arch, num_classes), arch, num_classes, head)


def vendor_state_dict(model: Classifier) -> dict[str, torch.Tensor]:
    """The imported model's weights under the vendor's own names (what `torchvision`'s module loads)."""
    head = getattr(model, "head_name", None)
    if head is None:
        raise EdgeguardError(f"{model.arch} was not imported; its weights have no vendor names")
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        elif k.startswith("head."):
            out[f"{head}.{k[len('head.'):]}"] = v
    return out


@torch.no_grad()
def check_split(original: nn.Module, model: Classifier, shape: tuple[int, int, int]) -> float:
    """Largest |difference| between the vendor's forward and head(encoder(x)) on two random inputs, eval mode;
    a split that does not reproduce the vendor's outputs is refused."""
    original.eval()
    model.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    a, b = original(x), model(x)
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        raise EdgeguardError("the model's forward does not return one logits tensor; edgeguard imports classifiers")
    diff = float((a - b).abs().max())
    if diff > 1e-4 * max(1.0, float(a.abs().max())):
        raise EdgeguardError(f"splitting at {model.head_name} changes the model's outputs (max |Δ| {diff:.2g}): that "
                             "layer is not applied last; name the final classifier layer with --head")
    return diff
