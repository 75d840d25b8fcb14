"""The bundle manifest: a versioned schema (dataclasses), strict field-level parsing, Ed25519 signatures.

`converters` writes it, the device reads it. The JSON Schema in `manifest.schema.json` is generated from
these dataclasses (`python -m runtime.manifest > runtime/manifest.schema.json`; a test keeps them equal).
The signed bytes are exactly manifest.json's bytes; the signature is manifest.sig (64 raw bytes).
Untrusted bytes are authenticated before they are interpreted (`read_manifest`): the signature is checked
over the raw bytes, then the JSON is parsed into bounded, typed fields (finite numbers, bounded integers,
file names that stay inside the bundle, lengths that agree), so a malformed manifest is always a
`BundleError` with one line, never an exception from deep inside.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .imagefile import RESIZE_POLICIES

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 2 added `protection`, typed `engine` and `slc_auc`
MAX_MANIFEST_BYTES = 4 << 20
MAX_INT = 2**53
MAX_STR = 4096
MAX_LIST = 100_000
MAX_MASK_ENTRIES = 1 << 34  # weights in one masked tensor


class BundleError(Exception):
    """Bad input (missing file, bad JSON, wrong key): exit 2."""

    exit_code = 2


class IntegrityError(BundleError):
    """A check failed (hash, signature, zero pattern, accuracy): exit 1."""

    exit_code = 1


@dataclass
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass
class InputSpec:
    shape: list[int]  # C, H, W
    dtype: str = "float32"
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    normalisation: str = "manifest"  # manifest: the runtime normalises; graph: the model does
    resize: str = "plain"  # how a frame of another size reaches H×W (runtime.imagefile): plain | center-crop
    crop: float = 1.0  # center-crop: the kept share of the shorter side
    input_name: str = "input"
    output_name: str = "logits"


@dataclass
class MaskSpec:
    file: str
    sha256: str
    layout: list[list]  # [[name, [dims...]], ...] in packing order
    initializers: dict[str, str]  # mask layer name → ONNX initializer name
    sparsity: float


@dataclass
class DomainCheck:
    name: str
    file: str  # validation/NAME.npz with x (uint8 N×3×H×W) and y (int64)
    sha256: str
    samples: int
    accuracy: float  # measured on the host with the exported model
    min_accuracy: float | None = None  # authorised: must reach
    max_accuracy: float | None = None  # unauthorised: must stay under


@dataclass
class TargetProfile:
    name: str
    backend: str  # onnxruntime | tensorrt
    precision: str = "fp32"
    compute_capability: str | None = None
    tensorrt_version: str | None = None
    jetpack: str | None = None
    workspace_mb: int = 1024
    dla: bool = False
    sparse_weights: bool = False


@dataclass
class EngineSpec:
    file: str
    sha256: str
    tensorrt_version: str | None = None
    compute_capability: str | None = None


@dataclass
class SlcAucEntry:
    slc_auc: float
    target: str


@dataclass
class Protection:
    """Whether and how the model is protected: `validate` says this first."""

    protected: bool
    method: str  # none | map | ntp | …
    summary: str  # one line a person reads, e.g. "map: 24.1 % of weights masked; SLC-AUC … "
    strength: str = ""  # none | weak | untested | direct-use | resists-fine-tuning ("" in older bundles)


@dataclass
class Manifest:
    schema_version: int
    created: str
    producer: str
    method: str
    classes: list[str]
    input: InputSpec
    model: FileEntry
    mask: MaskSpec
    authorised: DomainCheck
    target: TargetProfile
    unauthorised: list[DomainCheck] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)  # every other file the bundle carries
    engine: EngineSpec | None = None  # an engine built on the host (target tensorrt)
    slc_auc: dict[str, SlcAucEntry] | None = None  # attack name → its SLC-AUC against the target
    opset: int | None = None
    protection: Protection | None = None  # None only in schema-1 manifests
    measured_input: InputSpec | None = None  # the input the host measured the accuracies at (None: older bundles)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def is_finite_number(v) -> bool:
    """An int or float (never a bool) that is finite and at most 1e300 in size (a 5000-digit int is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and abs(v) <= 1e300
    except OverflowError:  # an integer too large for a float
        return False


def is_text(v, max_len: int = MAX_STR) -> bool:
    """A string of at most `max_len` characters, without NUL, that UTF-8 can encode (no lone surrogate, so it
    can become a file name or a line of output)."""
    if not isinstance(v, str) or len(v) > max_len or "\x00" in v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SCALARS = {  # type → (accepts, what the error says is expected); bool is never a number here
    float: (is_finite_number, "a finite number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT,
          f"an integer of at most {MAX_INT}"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (is_text, f"a UTF-8 string of at most {MAX_STR} characters without NUL"),
}


def _check(value, tp, where: str):
    """Validate and convert `value` against the annotation `tp`; raise BundleError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleError(f"manifest field {where or '(top)'}: expected an object")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{where}.{f.name}" if where else f.name
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise BundleError(f"manifest field {sub}: missing")
                continue
            kwargs[f.name] = _check(value[f.name], hints[f.name], sub)
        unknown = set(value) - {f.name for f in dataclasses.fields(tp)}
        if unknown:
            raise BundleError(f"manifest field {where + '.' if where else ''}{_show(sorted(unknown, key=str)[0])}: "
                              "unknown field")
        return tp(**kwargs)
    if origin is list or tp is list:  # a bare `list` (mask.layout) is checked element by element in _semantics
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise BundleError(f"manifest field {where}: expected a list of at most {MAX_LIST} items")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict) or len(value) > MAX_LIST:
            raise BundleError(f"manifest field {where}: expected an object")
        return {_check(k, args[0], f"{where} key"): _check(v, args[1], f"{where}.{_show(k)}") for k, v in value.items()}
    if tp in _SCALARS:
        ok, what = _SCALARS[tp]
        if not ok(value):
            raise BundleError(f"manifest field {where}: expected {what}, got {_show(value)}")
        return float(value) if tp is float else value
    raise BundleError(f"manifest field {where}: unsupported type")  # only reachable by a schema bug


def _show(v) -> str:
    """A short, printable rendering of an untrusted value for an error message."""
    text = ascii(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def safe_relpath(rel: str, where: str) -> str:
    """A bundle-relative file name: no absolute path, no `..`, no empty or over-long component."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or len(rel.encode()) > 1024
            or any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts)):
        raise BundleError(f"manifest field {where}: {_show(rel)} is not a safe file name inside the bundle")
    return rel


def _hex64(v: str, where: str) -> None:
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise BundleError(f"manifest field {where}: expected a sha256 (64 lower-case hex digits)")


def _unit(v: float | None, where: str) -> None:
    if v is not None and not 0.0 <= v <= 1.0:
        raise BundleError(f"manifest field {where}: expected a fraction in [0, 1], got {v}")


def _semantics(m: Manifest) -> None:
    """What types alone cannot say: names stay inside the bundle, lengths agree, values are in range."""
    entries = [("model", m.model)] + [(f"files[{i}]", f) for i, f in enumerate(m.files)]
    for where, e in entries:
        safe_relpath(e.path, f"{where}.path")
        _hex64(e.sha256, f"{where}.sha256")
        if e.size < 0:
            raise BundleError(f"manifest field {where}.size: must be ≥ 0")
    checks = [("authorised", m.authorised)] + [(f"unauthorised[{i}]", u) for i, u in enumerate(m.unauthorised)]
    for where, c in checks:
        safe_relpath(c.file, f"{where}.file")
        _hex64(c.sha256, f"{where}.sha256")
        for name in ("accuracy", "min_accuracy", "max_accuracy"):
            _unit(getattr(c, name), f"{where}.{name}")
        if c.samples < 0:
            raise BundleError(f"manifest field {where}.samples: must be ≥ 0")
    safe_relpath(m.mask.file, "mask.file")
    _hex64(m.mask.sha256, "mask.sha256")
    _unit(m.mask.sparsity, "mask.sparsity")
    names = set()
    for i, entry in enumerate(m.mask.layout):
        ok = (isinstance(entry, list) and len(entry) == 2 and is_text(entry[0]) and isinstance(entry[1], list)
              and len(entry[1]) <= 8 and all(type(d) is int and 0 <= d <= MAX_MASK_ENTRIES for d in entry[1]))
        if not ok:
            raise BundleError(f"manifest field mask.layout[{i}]: expected [name, [dims…]] with integer dims")
        size = 1
        for d in entry[1]:
            size *= d
        if size > MAX_MASK_ENTRIES or entry[0] in names:
            raise BundleError(f"manifest field mask.layout[{i}]: too large, or a repeated name")
        names.add(entry[0])
    for layer in m.mask.initializers:
        if layer not in names:
            raise BundleError(f"manifest field mask.initializers: {_show(layer)} is not a layer of mask.layout")
    spec = m.input
    if len(spec.shape) != 3 or not all(1 <= d <= 4096 for d in spec.shape):
        raise BundleError("manifest field input.shape: expected [C, H, W] with each in 1…4096")
    if len(spec.mean) != spec.shape[0] or len(spec.std) != spec.shape[0]:
        raise BundleError(f"manifest field input.mean/std: expected {spec.shape[0]} values (one per channel)")
    if not all(v > 0 for v in spec.std) or not spec.scale > 0:
        raise BundleError("manifest field input.std/scale: must be positive")
    for name, allowed in (("dtype", ("float32",)), ("layout", ("NCHW",)), ("normalisation", ("manifest", "graph"))):
        if getattr(spec, name) not in allowed:
            raise BundleError(f"manifest field input.{name}: expected one of {', '.join(allowed)}")
    if spec.resize not in RESIZE_POLICIES or not 0.1 <= spec.crop <= 1.0:
        raise BundleError(f"manifest field input.resize/crop: expected one of {', '.join(RESIZE_POLICIES)} and a "
                          "crop in [0.1, 1]")
    if not spec.input_name or not spec.output_name:
        raise BundleError("manifest field input.input_name/output_name: must not be empty")
    if not m.classes or not all(m.classes):
        raise BundleError("manifest field classes: expected a non-empty list of non-empty names")
    if m.target.backend not in ("onnxruntime", "tensorrt") or m.target.precision not in ("fp32", "fp16", "int8"):
        raise BundleError("manifest field target: backend must be onnxruntime or tensorrt, precision fp32, "
                          "fp16 or int8")
    if m.target.workspace_mb < 0 or (m.opset is not None and not 1 <= m.opset <= 1000):
        raise BundleError("manifest field target.workspace_mb / opset: out of range")
    if m.engine is not None:
        safe_relpath(m.engine.file, "engine.file")
        _hex64(m.engine.sha256, "engine.sha256")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise ValueError(f"the integer {text[:20]}… has more than 16 digits")
    return int(text)


def parse_manifest(data: bytes | str, source: str = "manifest.json") -> Manifest:
    """Strictly parse manifest bytes (authenticate them first where a key is given: `read_manifest`)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source}: {len(data):,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}")
    try:
        obj = json.loads(data, parse_constant=_reject_constant, parse_int=_bounded_int)
    except RecursionError:
        raise BundleError(f"{source}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{source}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{source}: expected a JSON object")
    version = obj.get("schema_version")
    if type(version) is not int or version not in READABLE_SCHEMAS:
        raise BundleError(f"{source}: manifest schema_version {_show(version)} is not supported (this runtime reads "
                          f"{', '.join(map(str, READABLE_SCHEMAS))}); update edgeguard-runtime or rebuild the bundle")
    try:
        manifest = _check(obj, Manifest, "")
        _semantics(manifest)
        return manifest
    except BundleError as e:
        raise BundleError(f"{source}: {e}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise BundleError(f"{source}: malformed manifest ({type(e).__name__})") from None


def read_manifest_bytes(bundle: str | Path) -> bytes:
    """manifest.json's raw bytes (bounded), with one-line errors for a missing or odd bundle."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    try:
        if not bundle.is_dir():
            raise BundleError(f"{bundle}: not a bundle folder")
        if not path.exists():
            raise BundleError(f"{path}: missing; a bundle holds manifest.json, manifest.sig and model.onnx")
        if not path.is_file():
            raise BundleError(f"{path}: not a regular file")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES:,} bytes; not an edgeguard manifest")
        return path.read_bytes()
    except OSError as e:
        raise BundleError(f"{bundle}: cannot read the manifest ({e.strerror or type(e).__name__})") from None


def read_manifest(bundle: str | Path, public_key=None, require_signature: bool = True) -> tuple[Manifest, bytes]:
    """Authenticate, then interpret: the signature over the raw bytes is checked before any parsing.

    `public_key` is a loaded Ed25519 key (or None: then `require_signature` must be False)."""
    raw = read_manifest_bytes(bundle)
    if public_key is not None:
        sig_path = Path(bundle) / "manifest.sig"
        try:
            if not sig_path.is_file():
                raise IntegrityError("signature: manifest.sig is missing")
            sig = sig_path.read_bytes()[:4096]
        except OSError as e:
            raise IntegrityError(f"signature: cannot read manifest.sig ({e.strerror})") from None
        verify_signature(raw, sig, public_key)
    elif require_signature:
        raise BundleError("no --public-key given: the device must check the vendor's signature "
                          "(pass --public-key vendor.pub, or --allow-unsigned for a bench test)")
    return parse_manifest(raw, str(Path(bundle) / "manifest.json")), raw


def load_manifest(bundle: str | Path) -> tuple[Manifest, bytes]:
    """Parse without a signature check (host-side tools; the device uses `read_manifest`)."""
    return read_manifest(bundle, None, require_signature=False)


# --- signatures -----------------------------------------------------------------------------------------------
def load_public_key(path: str | Path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    try:
        if p.is_dir():
            raise BundleError(f"{path}: is a folder; give the vendor's public key file (PEM)")
        data = p.read_bytes()[:1 << 16]
        key = serialization.load_pem_public_key(data)
    except FileNotFoundError:
        raise BundleError(f"{path}: public key file not found") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read the public key ({e.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BundleError(f"{path}: not a PEM public key ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def verify_signature(manifest_bytes: bytes, signature: bytes, public_key) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, manifest_bytes)
    except (InvalidSignature, ValueError, TypeError):
        raise IntegrityError("signature: manifest.sig does not verify with this public key (the manifest was "
                             "edited, or it was signed by another key)") from None


# --- JSON Schema ----------------------------------------------------------------------------------------------
def _schema_of(tp) -> dict:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return {"anyOf": [_schema_of(inner[0]), {"type": "null"}]}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {f.name: _schema_of(hints[f.name]) for f in dataclasses.fields(tp)}
        required = [f.name for f in dataclasses.fields(tp)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        return {"type": "object", "title": tp.__name__, "properties": props, "required": required,
                "additionalProperties": False}
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1])} if args else {"type": "object"}
    return {float: {"type": "number"}, int: {"type": "integer"}, bool: {"type": "boolean"},
            str: {"type": "string"}}.get(tp, {})


def json_schema() -> dict:
    s = _schema_of(Manifest)
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["$id"] = f"edgeguard-manifest-v{SCHEMA_VERSION}"
    s["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return s


if __name__ == "__main__":
    sys.stdout.write(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
