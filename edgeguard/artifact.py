"""The model file: one `.safetensors` with the weights (masked entries exactly 0), the packed mask bits and
string metadata (format version, architecture, method, domains, normalisation, classes, accuracies,
mask sha256). Written atomically; loading refuses unknown versions, truncated files and broken masks.
Nothing is ever unpickled.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtime.fileio import atomic_write_bytes

from .domains.base import MEAN, STD
from .errors import CheckFailed, EdgeguardError
from .masks import MaskSet

FORMAT_VERSION = "1"
MASK_KEY = "__edgeguard_mask_bits__"


@dataclass
class Artifact:
    """A model with its mask and description, as read from or written to disk."""

    model: nn.Module
    meta: dict
    mask: MaskSet | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def build_meta(model: nn.Module, *, arch: str, classes, source_domain: str, method: str = "none",
               method_config: dict | None = None, accuracies: dict | None = None,
               target_domains: list[str] | None = None, arch_args: dict | None = None,
               extra: dict | None = None) -> dict:
    """The metadata every artifact carries; callers add method specifics through `method_config`/`extra`."""
    meta = {
        "arch": arch,
        "arch_args": arch_args or {},
        "num_classes": len(classes),
        "classes": list(classes),
        "input": {"shape": [3, 32, 32], "dtype": "uint8", "mean": list(MEAN), "std": list(STD),
                  "scale": 1 / 255.0},
        "method": method,
        "method_config": method_config or {},
        "source_domain": source_domain,
        "target_domains": target_domains or [],
        "accuracies": accuracies or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        meta.update(extra)
    return meta


def save_artifact(path: str | os.PathLike, model: nn.Module, meta: dict, mask: MaskSet | None = None) -> Path:
    """Bake the mask into the weights and write the file atomically (temp file + rename)."""
    from safetensors.torch import save

    from . import __version__

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(meta)
    meta["edgeguard_version"] = __version__
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
        meta["mask"] = {"sha256": mask.sha256(), "layout": [[n, list(s)] for n, s in layout],
                        "sparsity": mask.sparsity(), "sparsity_per_layer": mask.sparsity_per_layer(),
                        "kept": kept, "total": total}
    else:
        meta["mask"] = None
    data = save(state, metadata={"edgeguard_format": FORMAT_VERSION, "edgeguard": json.dumps(meta)})
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
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeguardError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise EdgeguardError(f"{path}: not a safetensors file (header is not an object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise EdgeguardError(f"{path}: the header describes {8 + n + end} bytes but the file has {size}; "
                             "the file is truncated or was modified")
    return header, 8 + n


def read_meta(path: str | os.PathLike) -> dict:
    """Only the metadata (cheap: no tensors are read)."""
    path = Path(path)
    header, _ = read_header(path)
    md = header.get("__metadata__") or {}
    version = md.get("edgeguard_format")
    if version is None:
        raise EdgeguardError(f"{path}: a safetensors file but not an edgeguard model (no edgeguard_format); "
                             "write models with `edgeguard train` or edgeguard.save_artifact")
    if version != FORMAT_VERSION:
        raise EdgeguardError(f"{path}: edgeguard format version {version!r} is not supported by this release "
                             f"(it reads version {FORMAT_VERSION}); upgrade edgeguard")
    try:
        return json.loads(md["edgeguard"])
    except (KeyError, json.JSONDecodeError):
        raise EdgeguardError(f"{path}: the edgeguard metadata is missing or not JSON") from None


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> Artifact:
    """Read, check and rebuild a model. Raises EdgeguardError (bad file) or CheckFailed (broken mask)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .models import create_model

    path = Path(path)
    meta = read_meta(path)
    try:
        state = load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise EdgeguardError(f"{path}: cannot read tensors ({e})") from None
    mask = None
    bits = state.pop(MASK_KEY, None)
    if meta.get("mask"):
        if bits is None:
            raise CheckFailed(f"{path}: metadata describes a mask but the packed mask bits are missing")
        mask = MaskSet.unpack(bits.numpy().tobytes(), meta["mask"]["layout"])
        if mask.sha256() != meta["mask"]["sha256"]:
            raise CheckFailed(f"{path}: the packed mask's sha256 does not match the metadata; the file was modified")
        mask.verify(state, where=str(path))
    try:
        model = create_model(meta["arch"], meta["num_classes"], **meta.get("arch_args", {}))
    except KeyError as e:
        raise EdgeguardError(f"{path}: metadata lacks {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise EdgeguardError(f"{path}: weights do not fit architecture {meta['arch']!r} ({first})") from None
    model.to(device).eval()
    return Artifact(model=model, meta=meta, mask=mask.to(device) if mask is not None else None, path=path)
