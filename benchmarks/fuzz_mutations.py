"""Mutations of JSON documents (a bundle manifest, a model card) of the kinds a fuzzer or an attacker makes:
deleted fields, changed types, huge and non-finite numbers, lone surrogates, over-long names, deep nesting,
byte damage. Shared by tests/test_fuzz.py (hypothesis draws the arguments) and benchmarks/bench_fuzz.py.
"""
from __future__ import annotations

import json

KINDS = ("delete", "retype", "huge_number", "non_finite", "surrogate", "long_name", "deep_nesting", "bytes",
         "truncate", "path_escape", "negative", "empty_list")
VALUES = (None, True, 0, -1, 1.5, 2**64, "", "x", [], {}, [1, 2], {"a": 1}, "../../etc/passwd", "a\x00b")


def _paths(obj, prefix=()):
    """Every (container, key) path in a JSON value, depth first."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _set(obj, path, value):
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _delete(obj, path):
    cur = _get(obj, path[:-1])
    del cur[path[-1]]


def mutate(raw: bytes, kind: str, pick: int, value=None) -> bytes:
    """One mutation of `raw` (a JSON object's bytes); `pick` chooses the field or byte, `value` a new value."""
    if kind == "bytes":
        data = bytearray(raw)
        i = pick % max(len(data), 1)
        data[i] = (data[i] + 1 + pick // max(len(data), 1)) % 256
        return bytes(data)
    if kind == "truncate":
        return raw[: pick % max(len(raw), 1)]
    obj = json.loads(raw)
    paths = _paths(obj)
    path = paths[pick % len(paths)] if paths else None
    if kind == "delete" and path:
        _delete(obj, path)
    elif kind == "retype" and path:
        _set(obj, path, value if value is not None or pick % 2 else VALUES[pick % len(VALUES)])
    elif kind == "huge_number" and path:
        _set(obj, path, "__HUGE__")
        return json.dumps(obj).replace('"__HUGE__"', "9" * (10 + pick % 5000)).encode()
    elif kind == "non_finite" and path:
        _set(obj, path, "__NF__")
        token = ("NaN", "Infinity", "-Infinity", "1e400", "-1e999")[pick % 5]
        return json.dumps(obj).replace('"__NF__"', token).encode()
    elif kind == "surrogate" and path:
        _set(obj, path, "__SUR__")
        return json.dumps(obj).replace('"__SUR__"', '"name\\ud800.npz"').encode()
    elif kind == "long_name" and path:
        _set(obj, path, "n" * (256 + pick % 5000))
    elif kind == "deep_nesting" and path:
        _set(obj, path, "__DEEP__")
        depth = 100 + pick % 100_000
        return json.dumps(obj).replace('"__DEEP__"', "[" * depth + "]" * depth).encode()
    elif kind == "path_escape" and path:
        _set(obj, path, ("../outside.bin", "/etc/passwd", "validation/../../x", "a//b", "")[pick % 5])
    elif kind == "negative" and path:
        cur = _get(obj, path)
        _set(obj, path, -abs(cur) - 1 if isinstance(cur, (int, float)) and not isinstance(cur, bool) else -1)
    elif kind == "empty_list" and path:
        _set(obj, path, [])
    return json.dumps(obj).encode()
