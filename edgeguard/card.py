"""The model card: what a model file says about itself, as typed fields instead of string keys.

`artifact.py` writes it as JSON in the safetensors metadata and reads it back through `ModelCard.from_dict`,
which checks every field's type and says which one is wrong. Version-1 files (free dict, keys such as
`target_before:usps`) are upgraded on read.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field

from runtime.manifest import is_finite_number, is_text

from .errors import EdgeguardError
from .inputspec import RESIZE_POLICIES, InputSpec

ROLES = ("source", "target")
MAX_NAME = 256




@dataclass(frozen=True)
class DomainAccuracy:
    """Test accuracy on one domain: `before` the method ran (None for a freshly trained model) and `after`."""

    domain: str
    role: str  # source | target
    after: float
    before: float | None = None


@dataclass(frozen=True)
class MaskInfo:
    """The packed mask's description (the bits themselves are a tensor in the same file)."""

    sha256: str
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    sparsity: float
    sparsity_per_layer: dict[str, float]
    kept: int
    total: int


@dataclass
class ModelCard:
    arch: str
    classes: list[str]
    source_domain: str
    arch_args: dict = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    method: str = "none"
    method_config: dict = field(default_factory=dict)
    target_domains: list[str] = field(default_factory=list)
    accuracies: list[DomainAccuracy] = field(default_factory=list)
    mask: MaskInfo | None = None
    training: dict | None = None  # the source recipe and its history (`edgeguard train`)
    protection: dict | None = None  # the method's history, wall time, input model's sha256, notes
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    edgeguard_version: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def protected(self) -> bool:
        return self.method != "none"

    def accuracy(self, domain: str, role: str | None = None) -> DomainAccuracy | None:
        for a in self.accuracies:
            if a.domain == domain and (role is None or a.role == role):
                return a
        return None

    @property
    def source_accuracy(self) -> DomainAccuracy | None:
        return self.accuracy(self.source_domain, "source")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "model card") -> ModelCard:
        """Strict parse: every field's type is checked; the message names the field."""
        if not isinstance(d, dict):
            raise EdgeguardError(f"{where}: metadata is not an object")
        return _parse_card(d, where)


# --- strict parsing ------------------------------------------------------------------------------------------
def _fail(where: str, key: str, want: str, got) -> EdgeguardError:
    shown = ascii(got) if not isinstance(got, (dict, list)) else type(got).__name__
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return EdgeguardError(f"{where}: field {key!r} must be {want}, got {shown}; the file was edited or is damaged")


def _name(v, where: str, key: str) -> str:
    if not (is_text(v, MAX_NAME) and v):
        raise _fail(where, key, f"a non-empty UTF-8 string of at most {MAX_NAME} characters", v)
    return v


def _number(v, where: str, key: str, lo: float | None = None, hi: float | None = None) -> float:
    if not is_finite_number(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
        raise _fail(where, key, f"a finite number{rng}", v)
    return float(v)


def _int(v, where: str, key: str, lo: int = 0, hi: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(where, key, f"an integer in [{lo}, {hi}]", v)
    return v


def _dict(v, where: str, key: str, optional: bool = False) -> dict | None:
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        raise _fail(where, key, "an object", v)
    return v


def _list(v, where: str, key: str) -> list:
    if not isinstance(v, list):
        raise _fail(where, key, "a list", v)
    return v


def _parse_input(d, where: str) -> InputSpec:
    d = _dict(d, where, "input")
    shape = _list(d.get("shape"), where, "input.shape")
    if len(shape) != 3:
        raise _fail(where, "input.shape", "three integers (C, H, W)", shape)
    shape_t = tuple(_int(s, where, "input.shape", 1, 4096) for s in shape)
    mean = _list(d.get("mean"), where, "input.mean")
    std = _list(d.get("std"), where, "input.std")
    if len(mean) != shape_t[0] or len(std) != shape_t[0]:
        raise _fail(where, "input.mean/std", f"{shape_t[0]} values (one per channel)", [mean, std])
    std_t = tuple(_number(s, where, "input.std", 1e-12, 1e12) for s in std)
    resize = d.get("resize", "plain")  # files written before the input belonged to the model: plain
    if resize not in RESIZE_POLICIES:
        raise _fail(where, "input.resize", " or ".join(RESIZE_POLICIES), resize)
    return InputSpec(shape=shape_t, dtype=_name(d.get("dtype"), where, "input.dtype"),
                     mean=tuple(_number(m, where, "input.mean", -1e12, 1e12) for m in mean), std=std_t,
                     scale=_number(d.get("scale"), where, "input.scale", 1e-12, 1e12), resize=resize,
                     crop=_number(d.get("crop", 1.0), where, "input.crop", 0.1, 1.0))


def _parse_mask(d, where: str) -> MaskInfo | None:
    if d is None:
        return None
    d = _dict(d, where, "mask")
    sha = d.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _fail(where, "mask.sha256", "64 hex digits", sha)
    layout = []
    for entry in _list(d.get("layout"), where, "mask.layout"):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], (list, tuple)):
            raise _fail(where, "mask.layout", "[name, shape] pairs", entry)
        layout.append((_name(entry[0], where, "mask.layout name"),
                       tuple(_int(s, where, "mask.layout shape", 0, 1 << 31) for s in entry[1])))
    per_layer = _dict(d.get("sparsity_per_layer", {}), where, "mask.sparsity_per_layer")
    return MaskInfo(sha256=sha, layout=tuple(layout), sparsity=_number(d.get("sparsity"), where, "mask.sparsity", 0, 1),
                    sparsity_per_layer={_name(k, where, "mask.sparsity_per_layer"):
                                        _number(v, where, "mask.sparsity_per_layer", 0, 1) for k, v in per_layer.items()},
                    kept=_int(d.get("kept"), where, "mask.kept"), total=_int(d.get("total"), where, "mask.total"))


def _parse_accuracies(v, where: str) -> list[DomainAccuracy]:
    out = []
    for i, a in enumerate(_list(v, where, "accuracies")):
        a = _dict(a, where, f"accuracies[{i}]")
        role = a.get("role")
        if role not in ROLES:
            raise _fail(where, f"accuracies[{i}].role", "source or target", role)
        before = a.get("before")
        out.append(DomainAccuracy(domain=_name(a.get("domain"), where, f"accuracies[{i}].domain"), role=role,
                                  after=_number(a.get("after"), where, f"accuracies[{i}].after", 0, 1),
                                  before=None if before is None else _number(before, where,
                                                                             f"accuracies[{i}].before", 0, 1)))
    return out


def _parse_card(d: dict, where: str) -> ModelCard:
    classes = [_name(c, where, "classes") for c in _list(d.get("classes"), where, "classes")]
    if not 2 <= len(classes) <= 100_000:
        raise _fail(where, "classes", "a list of 2 or more class names", classes)
    targets = [_name(t, where, "target_domains") for t in _list(d.get("target_domains", []), where, "target_domains")]
    version = d.get("edgeguard_version", "")
    created = d.get("created", "")
    if not isinstance(version, str) or not isinstance(created, str):
        raise _fail(where, "edgeguard_version/created", "strings", [version, created])
    return ModelCard(arch=_name(d.get("arch"), where, "arch"), classes=classes,
                     source_domain=_name(d.get("source_domain"), where, "source_domain"),
                     arch_args=_dict(d.get("arch_args", {}), where, "arch_args"),
                     input=_parse_input(d.get("input"), where),
                     method=_name(d.get("method", "none"), where, "method"),
                     method_config=_dict(d.get("method_config", {}), where, "method_config"),
                     target_domains=targets, accuracies=_parse_accuracies(d.get("accuracies", []), where),
                     mask=_parse_mask(d.get("mask"), where),
                     training=_dict(d.get("training"), where, "training", optional=True),
                     protection=_dict(d.get("protection"), where, "protection", optional=True),
                     created=created, edgeguard_version=version)


def upgrade_v1(d) -> dict:
    """Format 1 kept accuracies as a flat dict ({domain: acc} for a source model; `source_before`,
    `target_after:NAME`, … for a protected one): turn them into the card's list."""
    if not isinstance(d, dict):
        return d
    d = dict(d)
    old = d.get("accuracies") or {}
    if not isinstance(old, dict):
        return d
    src = d.get("source_domain")
    rows: dict[tuple[str, str], dict] = {}
    for key, val in old.items():
        if not isinstance(key, str):
            continue
        head, _, dom = key.partition(":")
        if head in ("source_before", "source_after", "target_before", "target_after"):
            role, when = head.split("_")
            dom = dom or (src if role == "source" else "")
            rows.setdefault((role, dom), {"domain": dom, "role": role, "before": None})[when] = val
        else:
            rows[("source", key)] = {"domain": key, "role": "source", "before": None, "after": val}
    d["accuracies"] = list(rows.values())
    d.pop("num_classes", None)
    return d
