"""The model registry: `create_model(name, num_classes)` is the one way to build an architecture.

Every model is a `Classifier`: `encoder` (image → feature map) followed by `head` (pooling + classifier),
so that NTP, attacks and the Fisher term can address the two halves by name.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import EdgeguardError
from ..inputspec import DIGITS_INPUT, InputSpec

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_INPUTS: dict[str, InputSpec] = {}


class Classifier(nn.Module):
    """encoder (image → feature map) → head (pooling + classifier), addressed by name by NTP and the attacks."""

    def __init__(self, encoder: nn.Module, head: nn.Module, arch: str, num_classes: int,
                 input_spec: InputSpec = DIGITS_INPUT):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.arch = arch
        self.num_classes = num_classes
        self.input_spec = input_spec  # the input belongs to the model: loaders, loops and export read it here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def register_model(name: str, description: str, input_spec: InputSpec = DIGITS_INPUT) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        _DESCRIPTIONS[name] = description
        _INPUTS[name] = input_spec
        return fn

    return deco


def list_models() -> dict[str, str]:
    return dict(sorted(_DESCRIPTIONS.items()))


def input_of(model: nn.Module) -> InputSpec:
    """The input `model` expects (a Classifier carries its card's; anything else is read as a digits model)."""
    return getattr(model, "input_spec", DIGITS_INPUT)


def default_input(name: str) -> InputSpec:
    """The input a registered architecture is built for when the user names none."""
    return _INPUTS.get(name, DIGITS_INPUT)


def create_model(name: str, num_classes: int = 10, input_spec: InputSpec | None = None, **kwargs) -> Classifier:
    """Build an architecture from random init for `num_classes` outputs and `input_spec` (default: the
    architecture's own; every architecture here pools adaptively, so any size ≥ 32 px builds)."""
    if name not in _MODELS:
        from .imported import build_imported, is_import_spec

        if is_import_spec(name):
            model = build_imported(name, num_classes, **kwargs)
            model.input_spec = input_spec or DIGITS_INPUT
            return model
        raise EdgeguardError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(_MODELS))} (or import "
                             "your own with `edgeguard import`)")
    if num_classes < 2:
        raise EdgeguardError(f"num_classes must be at least 2, got {num_classes}")
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.input_spec = input_spec or default_input(name)
    return model


def _pool_linear(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


@register_model("small_cnn", "3 conv-BN-ReLU blocks (16-32-64) + linear head; for tests and the demo")
def small_cnn(num_classes: int = 10, width: int = 16) -> Classifier:
    w = width

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    encoder = nn.Sequential(*block(3, w), *block(w, 2 * w), *block(2 * w, 4 * w))
    return Classifier(encoder, _pool_linear(4 * w, num_classes), "small_cnn", num_classes)


@register_model("cnn32", "small_cnn at width 32 (32-64-128): the CPU reference model of the protection bars")
def cnn32(num_classes: int = 10) -> Classifier:
    model = small_cnn(num_classes, width=32)
    model.arch = "cnn32"
    return model


@register_model("resnet18", "torchvision ResNet-18 (standard stem, any size ≥ 32 px); head = avgpool + fc")
def resnet18(num_classes: int = 10) -> Classifier:
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(weights=None, num_classes=num_classes)
    encoder = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return Classifier(encoder, _pool_linear(512, num_classes), "resnet18", num_classes)


@register_model("vgg11", "torchvision VGG-11 with BN (any size ≥ 32 px); head = avgpool + 512-256-N MLP (NTL-style)")
def vgg11(num_classes: int = 10) -> Classifier:
    from torchvision.models import vgg11_bn

    m = vgg11_bn(weights=None)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 256), nn.ReLU(inplace=True),
                         nn.Linear(256, num_classes))
    return Classifier(m.features, head, "vgg11", num_classes)


@register_model("mobilenet_v3_small", "torchvision MobileNetV3-Small (any size ≥ 32 px); head = avgpool + classifier")
def mobilenet_v3_small(num_classes: int = 10) -> Classifier:
    from torchvision.models import mobilenet_v3_small as tv_mnv3

    m = tv_mnv3(weights=None, num_classes=num_classes)
    for bn in m.modules():  # torchvision's 0.01 leaves the running statistics far from the data after a short
        if isinstance(bn, nn.BatchNorm2d):  # training from random init: eval mode then predicts one class
            bn.momentum = 0.1
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *m.classifier)
    return Classifier(m.features, head, "mobilenet_v3_small", num_classes)


def _natural_ref_input() -> InputSpec:
    from ..inputspec import natural_input

    return natural_input(NATURAL_REF_SIZE)


NATURAL_REF_SIZE = 112


@register_model("natural_ref", f"mobilenet_v3_small at {NATURAL_REF_SIZE} px, ImageNet statistics, centre crop: the CPU "
                "reference model of the natural-image (PACS) rows", input_spec=_natural_ref_input())
def natural_ref(num_classes: int = 7) -> Classifier:
    model = mobilenet_v3_small(num_classes)
    model.arch = "natural_ref"
    return model
