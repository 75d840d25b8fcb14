"""Method configs as data: fields with help text, `KEY=VALUE` overrides, JSON round trips, printed help.

Every method config is a dataclass whose fields are made with `param(default, "help")`; nested configs
(MAP's `synth`, a method's `experimental`) are dataclass fields too and are reached with dotted keys
(`--set synth.n=512`). Types come from `typing.get_type_hints`, never from the default's value.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import EdgeguardError


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices=None):
    """A config field with its help line (and, for strings, the allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def _convert(raw: str, tp, where: str, choices=None) -> Any:
    inner, optional = _unwrap_optional(tp)
    text = raw.strip()
    if optional and text.lower() == "none":
        return None
    try:
        if inner is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value: Any = text.lower() in ("true", "1", "yes")
        elif inner is int:
            value = int(text)
        elif inner is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
        elif inner is str:
            value = text
        else:
            raise EdgeguardError(f"{where}: this field cannot be set from the command line")
    except ValueError:
        raise EdgeguardError(f"{where}: {raw!r} is not a valid {type_name(tp)}") from None
    if choices is not None and value not in choices:
        raise EdgeguardError(f"{where}: {raw!r} is not one of {', '.join(map(str, choices))}")
    return value


def field_paths(cls, prefix: str = "") -> list[str]:
    """Every settable key of a config class, nested ones dotted (`synth.n`)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def apply_overrides(cfg, items) -> Any:
    """A copy of `cfg` with `KEY=VALUE` strings applied (dotted keys reach nested configs); typed and checked."""
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise EdgeguardError(f"--set {item!r}: expected KEY=VALUE (see `edgeguard methods NAME` for the keys)")
        cfg = _set_path(cfg, key.split("."), raw, key)
    return cfg


def _set_path(cfg, parts: list[str], raw: str, full: str):
    cls = type(cfg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    name = parts[0]
    if name not in fields:
        raise EdgeguardError(f"--set {full}: unknown key; valid keys are {', '.join(field_paths(type(cfg)))}"
                             if len(parts) == 1 else f"--set {full}: unknown key {name!r}")
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
        if len(parts) == 1:
            raise EdgeguardError(f"--set {full}: {name} is a group; set one of its fields "
                                 f"({', '.join(field_paths(tp, name + '.'))})")
        return dataclasses.replace(cfg, **{name: _set_path(getattr(cfg, name), parts[1:], raw, full)})
    if len(parts) > 1:
        raise EdgeguardError(f"--set {full}: {name} has no sub-fields")
    value = _convert(raw, tp, f"--set {full}", fields[name].metadata.get("choices"))
    return dataclasses.replace(cfg, **{name: value})


def from_dict(cls, data: dict, where: str = "config"):
    """Build a config from a JSON-style dict (nested dicts for nested configs), checking every key and type."""
    if not isinstance(data, dict):
        raise EdgeguardError(f"{where}: expected an object of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    data = {k: v for k, v in data.items() if k not in getattr(cls, "RETIRED", ())}  # removed experiments' keys
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise EdgeguardError(f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        here = f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, here)
            continue
        inner, optional = _unwrap_optional(tp)
        if value is None and optional:
            kwargs[name] = None
        elif inner is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            kwargs[name] = float(value)
        elif inner in (int, str, bool) and type(value) is inner:
            kwargs[name] = value
        else:
            raise EdgeguardError(f"{here}: expected {type_name(tp)}, got {value!r}")
        choices = fields[name].metadata.get("choices")
        if choices is not None and kwargs[name] is not None and kwargs[name] not in choices:
            raise EdgeguardError(f"{here}: {value!r} is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, nested ones dotted: the source of `--help-config`."""
    rows = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" [{' | '.join(map(str, f.metadata['choices']))}]"
        rows.append((prefix + f.name, type_name(tp), repr(getattr(defaults, f.name)), help_text))
    return rows


def format_help(cls) -> str:
    rows = describe(cls)
    width = max(len(r[0]) for r in rows)
    tw = max(len(r[1]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {t:<{tw}}  {d:<10}  {h}" for k, t, d, h in rows)
