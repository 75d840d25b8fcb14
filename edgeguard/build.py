"""`edgeguard build`: load a protected artifact and hand it to the converters with its description."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .artifact import load_artifact
from .domains import get_domain
from .errors import CheckFailed, EdgeguardError


def _samples(name: str, n: int, data_root: str | None, seed: int = 0):
    from converters.bundle import DomainSamples

    d = get_domain(name, data_root)
    idx = np.sort(np.random.default_rng(seed).permutation(len(d.test_y))[:n])
    return DomainSamples(name, d.test_x[idx], d.test_y[idx])


def build(model_file: str | os.PathLike, out: str | os.PathLike, target: str = "onnx",
          sign_key: str | os.PathLike | None = None, precision: str | None = None, samples: int = 300,
          data_root: str | None = None, report: str | os.PathLike | None = None,
          unauthorised: list[str] | None = None) -> dict:
    """Export the artifact to a bundle. Validation samples come from the test splits of its domains."""
    from converters.bundle import BuildError, ModelDescription, build_bundle
    from converters.targets import get_target

    try:
        get_target(target)
    except ValueError as e:
        raise EdgeguardError(str(e)) from None
    art = load_artifact(model_file)
    card = art.card
    masks = art.mask.numpy() if art.mask is not None else {}
    unauth = unauthorised if unauthorised is not None else list(card.target_domains)
    slc = None
    if report:
        rp = Path(report) / "report.json" if Path(report).is_dir() else Path(report)
        try:
            r = json.loads(rp.read_text())
            slc = {e["attack"]: {"slc_auc": e["slc_auc"][0], "target": r["target"]} for e in r["attacks"]}
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise EdgeguardError(f"--report {report}: not an edgeguard evaluation report ({e})") from None
    desc = ModelDescription(
        classes=card.classes, masks=masks, method=card.method,
        authorised=_samples(card.source_domain, samples, data_root),
        unauthorised=[_samples(u, samples, data_root) for u in unauth],
        mean=tuple(card.input.mean), std=tuple(card.input.std), scale=card.input.scale,
        slc_auc=slc)
    try:
        return build_bundle(art.model, desc, out, target=target, sign_key=sign_key, precision=precision)
    except BuildError as e:
        raise CheckFailed(f"build failed, no bundle written: {e}") from None
    except ValueError as e:
        raise EdgeguardError(str(e)) from None
