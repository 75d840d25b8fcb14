"""`edgeguard build`: load a protected artifact and hand it to the converters with its description."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import load_artifact
from .domains import get_domain
from .errors import CheckFailed, EdgeguardError
from .strength import card_strength, with_fine_tuning


def _samples(name: str, n: int, data_root: str | None, card, role: str, class_map=None, seed: int = 0):
    """n test images of `name`, decoded at the model's input (the validation set the device checks)."""
    from converters.bundle import DomainSamples

    d = get_domain(name, data_root, classes=card.classes, class_map=class_map, role=role, input=card.input)
    idx = np.sort(np.random.default_rng(seed).permutation(len(d.test_y))[:n])
    return DomainSamples(name, d.test_x[idx], d.test_y[idx])


def build(model_file: str | os.PathLike, out: str | os.PathLike, target: str = "onnx",
          sign_key: str | os.PathLike | None = None, precision: str | None = None, samples: int = 300,
          data_root: str | None = None, report: str | os.PathLike | None = None,
          unauthorised: list[str] | None = None, allow_weak: bool = False, class_map=None,
          ota: OtaOptions | None = None, oms_key: str | os.PathLike | None = None) -> dict:
    """Export the artifact to a bundle. Validation samples come from the test splits of its domains.
    A protection that did not protect (`edgeguard.strength`) is refused unless `allow_weak`. With `ota`, a
    signed Mender Artifact of the bundle is written beside it (OUT + .mender); with `oms_key`, the bundle
    carries an OpenSSF model-signing signature (oms.sig)."""
    from converters.bundle import BuildError, ModelDescription, build_bundle
    from converters.targets import get_target

    try:
        get_target(target)
    except ValueError as e:
        raise EdgeguardError(str(e)) from None
    if ota is not None:
        ota.check()
    if oms_key is not None:
        _check_oms_key(oms_key)
    art = load_artifact(model_file)
    card = art.card
    masks = art.mask.numpy() if art.mask is not None else {}
    unauth = unauthorised if unauthorised is not None else list(card.target_domains)
    slc = _read_report(report) if report else None
    strength = with_fine_tuning(card_strength(card), {k: v["slc_auc"] for k, v in slc.items()} if slc else None)
    if not strength.shippable and not allow_weak:
        raise CheckFailed(f"{model_file}: weak protection ({strength.reason}); no bundle written. Protect it "
                          "again with other settings, or pass --allow-weak to ship it marked weak")
    desc = ModelDescription(
        classes=card.classes, masks=masks, method=card.method,
        authorised=_samples(card.source_domain, samples, data_root, card, "source"),
        unauthorised=[_samples(u, samples, data_root, card, "unauthorised", class_map) for u in unauth],
        mean=tuple(card.input.mean), std=tuple(card.input.std), scale=card.input.scale,
        input_shape=tuple(card.input.shape), resize=card.input.resize, crop=card.input.crop, slc_auc=slc, strength=strength.level, strength_reason=strength.reason)
    try:
        summary = build_bundle(art.model, desc, out, target=target, sign_key=sign_key, precision=precision,
                               oms_key=oms_key)
    except BuildError as e:
        raise CheckFailed(f"build failed, no bundle written: {e}") from None
    except ValueError as e:
        raise EdgeguardError(str(e)) from None
    if ota is not None:
        summary["ota"] = ota.write(Path(out), ota.model_name or _model_name(model_file))
    return summary


@dataclass
class OtaOptions:
    """`build --ota mender`: device types the artifact installs on, the ECDSA key that signs it, its name."""

    device_types: list[str]
    key: str
    kind: str = "mender"
    model_name: str | None = None
    version: str | None = None

    def check(self) -> None:
        """Everything the artifact needs, before any bundle is built."""
        from converters import mender
        from converters.signing import load_ota_key

        if self.kind != "mender":
            raise EdgeguardError(f"--ota {self.kind!r}: the one OTA system supported is mender")
        if not self.device_types:
            raise EdgeguardError("--ota mender needs at least one --device-type (e.g. jetson-orin-nano)")
        try:
            mender.tool()
            load_ota_key(self.key)
        except ValueError as e:
            raise EdgeguardError(str(e)) from None

    def write(self, bundle: Path, model_name: str) -> dict:
        from converters.mender import write_mender_artifact

        try:
            return write_mender_artifact(bundle, bundle.with_name(bundle.name + ".mender"), self.device_types,
                                         self.key, model_name, self.version)
        except ValueError as e:
            raise CheckFailed(f"the bundle {bundle} is built, but its Mender Artifact is not: {e}") from None


def _model_name(model_file) -> str:
    """An artifact-safe name from the model file's stem."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", Path(model_file).stem).strip("-._+") or "model"


def _check_oms_key(key) -> None:
    from converters.signing import load_ota_key
    from runtime.oms import available

    if not available():
        raise EdgeguardError("--oms-key needs OpenSSF model signing: pip install -e '.[oms]' (model-signing, "
                             "pyopenssl)")
    try:
        load_ota_key(key)
    except ValueError as e:
        raise EdgeguardError(str(e)) from None


def _read_report(report) -> dict:
    from .evaluation.result import EvalResult

    rp = Path(report) / "report.json" if Path(report).is_dir() else Path(report)
    try:
        r = EvalResult.from_dict(json.loads(rp.read_text()))
    except (OSError, json.JSONDecodeError, EdgeguardError) as e:
        raise EdgeguardError(f"--report {report}: not an edgeguard evaluation report ({e})") from None
    return {name: {"slc_auc": v, "target": r.target} for name, v in r.slc_aucs().items()}
