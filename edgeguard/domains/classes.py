"""Match a domain's class list to a model's: by name (labels re-indexed into the model's order), by position
only when the user says so (`--class-map position`), or through an explicit rename (`--class-map a=x,b=y`).

Equal class counts are not enough: a folder of other classes with the same count would be read with the
wrong labels and every number measured on it would be wrong without a sign.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import EdgeguardError
from .base import Domain

POSITION = "position"
HINT = ("if they are the same classes under other names, pass --class-map 'DOMAIN_CLASS=MODEL_CLASS,…' "
        "(or --class-map position to pair them by position)")


def parse_class_map(spec: str | dict | None) -> str | dict[str, str] | None:
    """None (match by name), "position", or {domain class: model class} from `a=x,b=y` (or a dict)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    if spec.strip() == POSITION:
        return POSITION
    out: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise EdgeguardError(f"--class-map {spec!r}: expected 'DOMAIN_CLASS=MODEL_CLASS,…' or 'position', "
                                 f"got {part.strip()!r}")
        if src.strip() in out:
            raise EdgeguardError(f"--class-map {spec!r}: {src.strip()!r} is mapped twice")
        out[src.strip()] = dst.strip()
    return out or None


def _show(names) -> str:
    names = list(names)
    text = ", ".join(names[:8])
    return text + (f", … ({len(names)} in all)" if len(names) > 8 else "")


def align_classes(domain: Domain, classes, class_map=None, role: str = "target") -> Domain:
    """`domain` with its labels in the model's class order and the model's class names, or a one-line error
    naming the classes that do not match."""
    classes = tuple(classes)
    class_map = parse_class_map(class_map)
    if class_map is None and domain.classes == classes:
        return domain
    what = f"{role} domain {domain.name}"
    if class_map == POSITION:
        if domain.num_classes != len(classes):
            raise EdgeguardError(f"{what} has {domain.num_classes} classes, the model {len(classes)}; "
                                 "--class-map position needs equal counts")
        return replace(domain, classes=classes)
    renamed = [class_map.get(c, c) if class_map else c for c in domain.classes]
    if class_map:
        unknown = sorted(set(class_map) - set(domain.classes))
        if unknown:
            raise EdgeguardError(f"--class-map names {_show(unknown)}, which {what} does not have "
                                 f"(its classes: {_show(domain.classes)})")
    missing_in_model = [c for c in renamed if c not in classes]
    missing_in_domain = [c for c in classes if c not in renamed]
    if missing_in_model or missing_in_domain or len(set(renamed)) != len(renamed):
        detail = []
        if missing_in_model:
            detail.append(f"not model classes: {_show(missing_in_model)}")
        if missing_in_domain:
            detail.append(f"missing from the domain: {_show(missing_in_domain)}")
        if len(set(renamed)) != len(renamed):
            detail.append("two domain classes map to one model class")
        raise EdgeguardError(f"{what}: its classes ({_show(domain.classes)}) do not match the model's "
                             f"({_show(classes)}): {'; '.join(detail)}; {HINT}")
    lut = np.asarray([classes.index(c) for c in renamed], np.int64)
    return replace(domain, train_y=lut[domain.train_y], test_y=lut[domain.test_y], classes=classes)
