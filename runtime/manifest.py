"""The bundle manifest: a versioned schema (dataclasses), field-level load errors, Ed25519 signatures.

`converters` writes it, the device reads it. The JSON Schema in `manifest.schema.json` is generated from
these dataclasses (`python -m runtime.manifest > runtime/manifest.schema.json`; a test keeps them equal).
The signed bytes are exactly manifest.json's bytes; the signature is manifest.sig (64 raw bytes).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1


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
    engine: dict | None = None  # {"file", "sha256", "tensorrt_version", "compute_capability"} when prebuilt
    slc_auc: dict | None = None
    opset: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


_SCALARS = {  # type → (accepts, what the error says is expected); bool is never a number here
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    dict: (lambda v: isinstance(v, dict), "an object"),
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
            raise BundleError(f"manifest field {where + '.' if where else ''}{sorted(unknown)[0]}: unknown field")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"manifest field {where}: expected a list")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest field {where}: expected an object")
        if args:
            return {str(_check(k, args[0], where)): _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp in _SCALARS:
        ok, what = _SCALARS[tp]
        if not ok(value):
            got = "" if tp in (bool, dict) else f", got {type(value).__name__}"
            raise BundleError(f"manifest field {where}: expected {what}{got}")
        return float(value) if tp is float else value
    return value


def parse_manifest(data: bytes | str, source: str = "manifest.json") -> Manifest:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{source}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{source}: expected a JSON object")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{source}: manifest schema_version {version!r} is not supported (this runtime reads "
                          f"{SCHEMA_VERSION}); update edgeguard-runtime or rebuild the bundle")
    try:
        return _check(obj, Manifest, "")
    except BundleError as e:
        raise BundleError(f"{source}: {e}") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise BundleError(f"{source}: malformed manifest ({e})") from None


def load_manifest(bundle: str | Path) -> tuple[Manifest, bytes]:
    path = Path(bundle) / "manifest.json"
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    if not path.exists():
        raise BundleError(f"{path}: missing; a bundle holds manifest.json, manifest.sig and model.onnx")
    data = path.read_bytes()
    return parse_manifest(data, str(path)), data


# --- signatures -----------------------------------------------------------------------------------------------
def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{path}: public key file not found") from None
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def verify_signature(manifest_bytes: bytes, signature: bytes, public_key) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
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
            str: {"type": "string"}, dict: {"type": "object"}}.get(tp, {})


def json_schema() -> dict:
    s = _schema_of(Manifest)
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["$id"] = f"edgeguard-manifest-v{SCHEMA_VERSION}"
    s["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return s


if __name__ == "__main__":
    sys.stdout.write(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
