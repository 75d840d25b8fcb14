"""The model file: one `.safetensors` with the weights (masked entries exactly 0), the packed mask bits and
the model card (`card.ModelCard`) as JSON metadata. Written atomically; loading refuses unknown versions,
truncated files, malformed cards and broken masks. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from runtime.fileio import atomic_write_bytes

from .card import MaskInfo, ModelCard, upgrade_v1
from .errors import CheckFailed, EdgeguardError
from .masks import MaskSet

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # version 1: a free metadata dict, upgraded to a ModelCard on read
MASK_KEY = "__edgeguard_mask_bits__"


@dataclass
class Artifact:
    """A model with its mask and card, as read from or written to disk."""

    model: nn.Module
    card: ModelCard
    mask: MaskSet | None = None
    path: Path | None = field(default=None, compare=False)


def save_artifact(path: str | os.PathLike, model: nn.Module, card: ModelCard, mask: MaskSet | None = None) -> Path:
    """Bake the mask into the weights, describe it in the card, and write the file atomically."""
    from safetensors.torch import save

    from . import __version__

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    info = None
    if mask is not None:
        mask = mask.cpu()
        for name, m in mask.masks.items():
            if name not in state:
                raise EdgeguardError(f"mask names {name!r} but the model has no such weight")
            state[name] = state[name] * m.to(state[name].dtype)
        bits, layout = mask.pack()
        state[MASK_KEY] = torch.frombuffer(bytearray(bits), dtype=torch.uint8) if bits else \
            torch.zeros(0, dtype=torch.uint8)
        kept, total = mask.counts()
        info = MaskInfo(sha256=mask.sha256(), layout=tuple((n, tuple(s)) for n, s in layout),
                        sparsity=mask.sparsity(), sparsity_per_layer=mask.sparsity_per_layer(), kept=kept, total=total)
    card = replace(card, mask=info, edgeguard_version=__version__)
    data = save(state, metadata={"edgeguard_format": FORMAT_VERSION, "edgeguard": json.dumps(card.to_dict())})
    atomic_write_bytes(path, data)
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and check the safetensors header: (header dict, data offset). Truncation is caught here."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EdgeguardError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise EdgeguardError(f"{path}: header length {n} exceeds the file; the file is truncated or "
                                     "not a safetensors model")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise EdgeguardError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EdgeguardError(f"{path}: is a folder, expected an edgeguard .safetensors file") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EdgeguardError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise EdgeguardError(f"{path}: not a safetensors file (header is not an object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offs = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and 0 <= o <= size for o in offs)):
            raise EdgeguardError(f"{path}: tensor {k[:60]!r} has no valid data_offsets; the file is damaged")
        end = max(end, offs[1])
    if 8 + n + end != size:
        raise EdgeguardError(f"{path}: the header describes {8 + n + end} bytes but the file has {size}; "
                             "the file is truncated or was modified")
    return header, 8 + n


def read_card(path: str | os.PathLike) -> ModelCard:
    """Only the model card (cheap: no tensors are read); strict about every field."""
    path = Path(path)
    header, _ = read_header(path)
    md = header.get("__metadata__") or {}
    if not isinstance(md, dict):
        raise EdgeguardError(f"{path}: the safetensors metadata is not an object; the file is damaged")
    version = md.get("edgeguard_format")
    if version is None:
        raise EdgeguardError(f"{path}: a safetensors file but not an edgeguard model (no edgeguard_format); "
                             "write models with `edgeguard train` or edgeguard.artifact.save_artifact")
    if version not in READABLE_VERSIONS:
        raise EdgeguardError(f"{path}: edgeguard format version {version!r} is not supported by this release "
                             f"(it reads versions {', '.join(READABLE_VERSIONS)}); upgrade edgeguard")
    try:
        raw = json.loads(md["edgeguard"])
    except (KeyError, TypeError, ValueError, RecursionError):  # ValueError: bad JSON, a 5000-digit integer
        raise EdgeguardError(f"{path}: the edgeguard metadata is missing or not JSON") from None
    if version == "1":
        raw = upgrade_v1(raw)
    return ModelCard.from_dict(raw, where=str(path))


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> Artifact:
    """Read, check and rebuild a model. Raises EdgeguardError (bad file) or CheckFailed (broken mask)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .models import create_model

    path = Path(path)
    card = read_card(path)
    try:
        state = load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise EdgeguardError(f"{path}: cannot read tensors ({e})") from None
    mask = None
    bits = state.pop(MASK_KEY, None)
    if card.mask is not None:
        if bits is None:
            raise CheckFailed(f"{path}: metadata describes a mask but the packed mask bits are missing")
        mask = MaskSet.unpack(bits.numpy().tobytes(), card.mask.layout)
        if mask.sha256() != card.mask.sha256:
            raise CheckFailed(f"{path}: the packed mask's sha256 does not match the metadata; the file was modified")
        mask.verify(state, where=str(path))
    try:
        model = create_model(card.arch, card.num_classes, input_spec=card.input, **card.arch_args)
    except EdgeguardError as e:
        raise EdgeguardError(f"{path}: {e}") from None
    except Exception as e:  # arch_args the architecture does not take, or values it cannot use
        raise EdgeguardError(f"{path}: arch_args do not fit architecture {card.arch!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise EdgeguardError(f"{path}: weights do not fit architecture {card.arch!r} ({first})") from None
    model.to(device).eval()
    return Artifact(model=model, card=card, mask=mask.to(device) if mask is not None else None, path=path)
