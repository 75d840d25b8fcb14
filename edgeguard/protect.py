"""The one protection pipeline: `edgeguard protect`, the demo, the benchmarks and the Python API call it.

load and check the source model → prepare the data the method needs → measure before → run the method
(it only computes) → measure after → write the model file with its card, `OUT.config.json` → clear the
checkpoints. A killed run resumes from `OUT.ckpt/` with `resume=True`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.fileio import atomic_write_text, sha256_file

from .artifact import load_artifact, save_artifact
from .card import DomainAccuracy
from .config import apply_overrides, from_dict
from .devices import resolve_device
from .domains import get_domain
from .domains.classes import align_classes
from .errors import EdgeguardError
from .methods.base import Checkpoints, ProtectionData, config_json, get_method, list_methods
from .strength import direct_use
from .training import TensorData, evaluate


@dataclass
class ProtectSummary:
    """What `protect` returns (and `edgeguard protect --json` prints)."""

    out: str
    method: str
    seconds: float
    sparsity: float
    accuracies: list[DomainAccuracy] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    strength: dict = field(default_factory=dict)  # edgeguard.strength: level and reason

    def accuracy(self, domain: str) -> DomainAccuracy | None:
        return next((a for a in self.accuracies if a.domain == domain), None)

    @property
    def source(self) -> DomainAccuracy | None:
        return next((a for a in self.accuracies if a.role == "source"), None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        parts = [f"{self.method.upper()}: sparsity {self.sparsity * 100:.1f}%"]
        for a in self.accuracies:
            before = f"{a.before * 100:.2f}% → " if a.before is not None else ""
            parts.append(f"{a.role} {a.domain} {before}{a.after * 100:.2f}%")
        parts.append(f"{self.seconds:.0f} s → {self.out}")
        return ", ".join(parts) + (f"; protection {self.strength['level']}" if self.strength else "")

    @property
    def weak(self) -> bool:
        return self.strength.get("level") == "weak"


def read_config_file(path: str | os.PathLike) -> tuple[str, dict]:
    """(method name, config dict) from an `OUT.config.json` written by `protect`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise EdgeguardError(f"--config {p}: no such file") from None
    except IsADirectoryError:
        raise EdgeguardError(f"--config {p}: is a folder; give the OUT.config.json file protect wrote") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeguardError(f"--config {p}: not JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("method"), str) or not isinstance(d.get("config"), dict):
        raise EdgeguardError(f"--config {p}: expected {{\"method\": NAME, \"config\": {{...}}}} as protect writes it")
    return d["method"], d["config"]


def make_config(method: str, config=None, overrides=(), config_file: str | os.PathLike | None = None):
    """The method's config: the defaults, or `config`, or a config file's, then `KEY=VALUE` overrides; checked."""
    m = get_method(method)
    if config_file is not None:
        file_method, d = read_config_file(config_file)
        if file_method != m.name:
            raise EdgeguardError(f"--config {config_file} is a {file_method} config, not {m.name}")
        config = from_dict(m.config_cls, d, where=str(config_file))
    cfg = config if config is not None else m.config_cls()
    if not isinstance(cfg, m.config_cls):
        raise EdgeguardError(f"method {m.name} takes a {m.config_cls.__name__}, got {type(cfg).__name__}")
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def _test_split(domain, device) -> TensorData | None:
    return TensorData.from_numpy(domain.test_x, domain.test_y, device) if domain is not None else None


def _train_split(domain, device, labels: bool) -> TensorData:
    y = domain.train_y if labels else np.zeros(len(domain.train_y), np.int64)  # unneeded labels never reach it
    return TensorData.from_numpy(domain.train_x, y, device)


def protect(method: str, source_model: str | os.PathLike, out: str | os.PathLike, *, target: str | None = None,
            config=None, overrides=(), config_file: str | os.PathLike | None = None, data_root: str | None = None,
            device: str = "auto", resume: bool = False, class_map=None) -> ProtectSummary:
    """Protect `source_model` against reuse on `target` with a registered method; write `out` (.safetensors)."""
    m = get_method(method)
    cfg = make_config(method, config, overrides, config_file)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise EdgeguardError(f"--out {out}: the model file must end in .safetensors")
    if out.exists() and out.is_dir():
        raise EdgeguardError(f"--out {out}: is a folder; give a .safetensors file name")
    if out.resolve() == Path(source_model).resolve():
        raise EdgeguardError(f"--out {out} is the source model itself; write the protected model to a new file")
    dev = resolve_device(device)
    art = load_artifact(source_model, dev)
    card = art.card
    if card.protected and not m.refines:
        raise EdgeguardError(f"{source_model}: already protected ({card.method}); start from the source model "
                             "(only a refining method such as harden takes a protected model)")
    if card.protected and card.method.endswith(f"+{m.name}"):
        raise EdgeguardError(f"{source_model}: already {card.method}; {m.name} it once, from its input")
    if card.protected and card.target_domains and target and target not in card.target_domains:
        raise EdgeguardError(f"{source_model} is protected against {', '.join(card.target_domains)}, not {target}; "
                             f"{m.name} it against the same --target")
    needs = m.needs(cfg)
    if needs.target_images and not target:
        raise EdgeguardError(f"method {m.name} with these settings needs --target DOMAIN (the unauthorised domain)")
    if target and target == card.source_domain:
        raise EdgeguardError(f"--target {target} is the model's authorised (source) domain; give the domain to "
                             "protect against")
    tgt_dom = get_domain(target, data_root, classes=card.classes, class_map=class_map,
                         input=card.input) if target else None
    try:
        src_dom = get_domain(card.source_domain, data_root, input=card.input)
    except EdgeguardError:
        if needs.source_images:
            raise
        src_dom = None  # the method does without source data; the source is measured only where it is here
    if src_dom is not None:
        src_dom = align_classes(src_dom, card.classes, role="source")
    data = ProtectionData(
        source=_train_split(src_dom, dev, needs.source_labels) if needs.source_images else None,
        target=_train_split(tgt_dom, dev, needs.target_labels) if needs.target_images else None,
        num_classes=card.num_classes, device=dev, mask=art.mask if card.protected else None)
    model = art.model
    tests = {"source": _test_split(src_dom, dev), "target": _test_split(tgt_dom, dev)}  # before and after
    before = {role: evaluate(model, t) if t is not None else None for role, t in tests.items()}
    source_sha = sha256_file(source_model)

    ckpt_dir = out.with_name(out.name + ".ckpt")
    run_key = json.dumps({"method": m.name, "config": dataclasses.asdict(cfg), "target": target,
                          "source_model_sha256": source_sha}, sort_keys=True, default=str)
    _prepare_checkpoints(ckpt_dir, run_key, resume)

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    result = m.run(model, data, cfg, Checkpoints(ckpt_dir, resume))
    seconds = time.perf_counter() - t0

    protected = result.model
    result.mask.to(dev).bake_(protected)
    accs = []
    for role, domain in (("source", card.source_domain), ("target", target)):
        if tests[role] is not None:
            accs.append(DomainAccuracy(domain, role, evaluate(protected, tests[role]), before[role]))
    strength = _strength(m.name if not card.protected else f"{card.method}+{m.name}", card, target, accs,
                         before["target"])
    protection = {"history": result.history, "seconds": round(seconds, 2), "data": needs.describe(),
                  "source_model_sha256": source_sha, "strength": strength.to_dict(), **result.notes}
    method_name = m.name
    if card.protected:  # a refinement: the card names both steps and keeps the input's record
        method_name = f"{card.method}+{m.name}"
        protection["input"] = {"method": card.method, "method_config": card.method_config,
                               "target_domains": card.target_domains, "protection": card.protection,
                               "weights_changed": "the refinement trains the kept weights (a frozen-weight "
                                                  "method's weights included); the mask is the input's"}
    new_card = dataclasses.replace(
        card, method=method_name, method_config=dataclasses.asdict(cfg), target_domains=[target] if target else [],
        accuracies=accs, training=None, protection=protection)
    save_artifact(out, protected.cpu(), new_card, result.mask)
    atomic_write_text(out.with_name(out.name + ".config.json"), config_json(m, cfg))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return ProtectSummary(out=str(out), method=m.name, seconds=round(seconds, 2), sparsity=result.mask.sparsity(),
                          accuracies=accs, config=dataclasses.asdict(cfg), strength=strength.to_dict())


def _strength(method: str, card, target: str | None, accs: list[DomainAccuracy], measured_before: float | None):
    """The direct-use verdict against the unprotected model: for a refinement, the input's own `before`."""
    after = next((a.after for a in accs if a.role == "target"), None)
    recorded = card.accuracy(target, "target") if (card.protected and target) else None
    before = recorded.before if recorded is not None and recorded.before is not None else measured_before
    return direct_use(method, target, before, after, card.num_classes)


def split_overrides(methods: list[str], overrides) -> list[list[str]]:
    """`--set KEY=V` goes to the first method, `--set METHOD.KEY=V` to that method of the chain (a method named
    twice, or a prefix naming none of the chain, is an error naming the fix)."""
    if len(set(methods)) != len(methods):
        raise EdgeguardError(f"a method appears twice in the chain {' → '.join(methods)}")
    out: list[list[str]] = [[] for _ in methods]
    for o in overrides:
        head, dot, rest = o.partition(".")
        if dot and head in methods and "=" in rest and "=" not in head:
            out[methods.index(head)].append(rest)
        elif dot and "=" not in head and head in _method_names() and head not in methods:
            raise EdgeguardError(f"--set {o}: {head} is not in this chain ({' → '.join(methods)}); add --then {head}")
        else:
            out[0].append(o)
    return out


def _method_names() -> set[str]:
    return {m.name for m in list_methods()}


def protect_chain(methods: list[str], source_model: str | os.PathLike, out: str | os.PathLike, *,
                  target: str | None = None, overrides=(), config_file=None, data_root: str | None = None,
                  device: str = "auto", resume: bool = False, class_map=None) -> list[ProtectSummary]:
    """`protect --method A --then B …`: A protects the source model, each refining method after it refines the
    previous file; every stage but the last writes OUT's stem + `.<method>.safetensors`. With `resume`, a
    finished stage's file is reused and the running stage continues from its checkpoints."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise EdgeguardError(f"--out {out}: the model file must end in .safetensors")
    for later in methods[1:]:
        if not get_method(later).refines:
            refining = ", ".join(m for m in sorted(_method_names()) if get_method(m).refines)
            raise EdgeguardError(f"--then {later}: only a refining method ({refining}) can follow another")
    per = split_overrides(methods, overrides)
    for m, o in zip(methods, per):
        make_config(m, None, o, config_file if m == methods[0] else None)  # bad settings fail before stage 1
    summaries, previous = [], Path(source_model)
    for i, method in enumerate(methods):
        dest = out if i == len(methods) - 1 else out.with_name(f"{out.stem}.{method}.safetensors")
        if resume and i < len(methods) - 1 and dest.exists() and not dest.with_name(dest.name + ".ckpt").exists():
            summaries.append(_summary_of(dest))
        else:
            summaries.append(protect(method, previous, dest, target=target, overrides=per[i],
                                     config_file=config_file if i == 0 else None, data_root=data_root,
                                     device=device, resume=resume, class_map=class_map))
        previous = dest
    return summaries


def _summary_of(path: Path) -> ProtectSummary:
    """The summary of a protected file written earlier (from its card)."""
    from .artifact import read_card

    card = read_card(path)
    sparsity = card.mask.sparsity if card.mask is not None else 0.0
    return ProtectSummary(out=str(path), method=card.method, seconds=float((card.protection or {}).get("seconds", 0)),
                          sparsity=sparsity, accuracies=list(card.accuracies), config=card.method_config,
                          strength=dict((card.protection or {}).get("strength") or {}))


def _prepare_checkpoints(ckpt_dir: Path, run_key: str, resume: bool) -> None:
    """A fresh checkpoint folder, or (resume) the existing one if it was written by the same run."""
    key_file = ckpt_dir / "run.json"
    if resume and key_file.exists():
        if key_file.read_text() != run_key:
            raise EdgeguardError(f"{ckpt_dir}: written by a run with other settings, source or target; "
                                 "delete it or run without --resume")
        return
    if ckpt_dir.is_file():  # an older release's single-file checkpoint: not resumable here
        ckpt_dir.unlink()
    if ckpt_dir.is_dir() and not resume:
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_file, run_key)
