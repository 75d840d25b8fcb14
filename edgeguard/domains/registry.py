"""The domain registry: a name → loader map, the data-root lookup and an on-disk cache of decoded arrays."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import cache
from ..errors import EdgeguardError
from ..inputspec import DIGITS_INPUT, InputSpec
from . import formats
from .base import DIGITS, Domain, fixed_shuffle, split_by_index, to_input
from .classes import align_classes
from .folders import decode_into, list_image_folder, stratified_split, write_split

log = logging.getLogger(__name__)

Loader = Callable[[Path, InputSpec, Path], Domain]  # (data folder, model input, cache entry being built)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    folder: str  # sub-folder of the data root ("" for embedded domains)
    description: str
    loader: Loader


_REGISTRY: dict[str, DomainSpec] = {}
_MEMO: dict[tuple[str, str, str, str], Domain] = {}  # (name, folder, fingerprint, input): edits are reread


def register_domain(name: str, folder: str, description: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = DomainSpec(name, folder, description, fn)
        return fn

    return deco


def list_domains() -> list[DomainSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path | None:
    root = data_root or os.environ.get("EDGEGUARD_DATA_ROOT")
    return Path(root).expanduser() if root else None


def _cache_dir() -> Path:
    return cache.cache_dir("domains")


def _fingerprint(folder: Path) -> str:
    """Identity of the files a domain is read from (every file's name, size and mtime), so the cache follows
    edits: an image overwritten in place is decoded again."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    if folder.is_file():
        st = folder.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        st = os.stat(dirpath)
        h.update(f"{dirpath}:{st.st_mtime_ns}:{len(filenames)}".encode())
        for fn in sorted(filenames):
            s = os.stat(os.path.join(dirpath, fn))
            h.update(f"{fn}:{s.st_size}:{s.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


PARTS = ("train_x", "train_y", "test_x", "test_y")
MMAP_BYTES = 256 << 20  # arrays above this stay on disk, memory-mapped (copy-on-write), read a batch at a time


def _read_entry(name: str, entry: Path) -> Domain:
    arrays = {}
    for part in PARTS:
        f = entry / f"{part}.npy"
        big = f.stat().st_size > MMAP_BYTES
        arrays[part] = np.load(f, mmap_mode="c" if big else None, allow_pickle=False)
    classes = tuple(json.loads((entry / "classes.json").read_text()))
    return Domain(name, arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], classes)


def _cached(name: str, key: str, build: Callable[[Path], Domain]) -> Domain:
    """The decoded domain from its cache entry (a folder of .npy arrays), built by `build(tmp_entry)` into a
    temporary folder and renamed into place when missing or damaged."""
    entry = _cache_dir() / f"{name.replace(':', '_').replace('/', '_')[:80]}-{key}"
    if (entry / "done").exists():
        try:
            return _read_entry(name, entry)
        except (OSError, ValueError, json.JSONDecodeError):  # a damaged entry is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError:  # a read-only home only costs speed
        return build(Path(tempfile.mkdtemp(prefix="edgeguard-domain-")))
    try:
        dom = build(tmp)
        for part in PARTS:
            if not (tmp / f"{part}.npy").exists():
                np.save(tmp / f"{part}.npy", getattr(dom, part))
        (tmp / "classes.json").write_text(json.dumps(list(dom.classes)))
        (tmp / "done").write_text("")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _read_entry(name, entry)


def get_domain(name: str, data_root: str | os.PathLike | None = None, *, classes=None, class_map=None,
               role: str = "target", input: InputSpec = DIGITS_INPUT) -> Domain:
    """Load a registered domain (or `imagefolder:PATH`) decoded at `input` (a model's InputSpec: size,
    channels, resize policy) with int64 labels. With `classes` (a model's class names) the labels are matched
    to them by name (`domains.classes`)."""
    dom = _load_domain(name, data_root, input)
    return dom if classes is None else align_classes(dom, classes, class_map, role)


def _memo(name: str, folder: Path | None, spec: InputSpec, build: Callable[[Path], Domain]) -> Domain:
    fp = _fingerprint(folder) if folder is not None else ""
    key = (name, str(folder.resolve()) if folder is not None else "", fp, spec.key())
    if key not in _MEMO:
        _MEMO[key] = _cached(name, f"{fp}-{spec.key()}", build) if folder is not None else build(Path())
    return _MEMO[key]


def _load_domain(name: str, data_root: str | os.PathLike | None, spec: InputSpec) -> Domain:
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            where = "" if folder.is_absolute() else f" (relative to the current folder {Path.cwd()})"
            raise EdgeguardError(f"{name}: {folder} is {'not a folder' if folder.exists() else 'not found'}{where}; "
                                 "give the path of a folder with one sub-folder of images per class")
        return _memo(name, folder, spec, lambda entry: load_imagefolder(folder, name, spec, entry))
    spec_ = _REGISTRY.get(name)
    if spec_ is None:
        known = ", ".join(sorted(_REGISTRY)) + ", imagefolder:PATH"
        raise EdgeguardError(f"unknown domain {name!r}; known domains: {known}")
    if not spec_.folder:
        return _memo(name, None, spec, lambda entry: spec_.loader(Path(), spec, entry))
    root = resolve_data_root(data_root)
    if root is None:
        raise EdgeguardError(f"domain {name!r} needs a data root: pass --data-root DIR or set EDGEGUARD_DATA_ROOT "
                             f"(DIR/{spec_.folder} must hold it); the embedded samples need none: "
                             f"{', '.join(s.name for s in list_domains() if not s.folder)}")
    folder = root / spec_.folder
    if not folder.exists():
        raise EdgeguardError(f"{folder}: not found; expected the {name} data set there ({spec_.description})")
    return _memo(name, folder, spec, lambda entry: spec_.loader(folder, spec, entry))


def _finish(name: str, trx, try_, tex, tey, classes, spec: InputSpec) -> Domain:
    """Arrays decoded at their native size → the model's input, in the fixed shuffled order, labels checked."""
    trx, try_ = fixed_shuffle(to_input(trx, spec), np.asarray(try_, np.int64), seed=0)
    tex, tey = fixed_shuffle(to_input(tex, spec), np.asarray(tey, np.int64), seed=1)
    for y, part in ((try_, "train"), (tey, "test")):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise EdgeguardError(f"{name}: {part} labels outside 0..{len(classes) - 1}")
    return Domain(name, trx, try_, tex, tey, tuple(classes))


@register_domain("mnist", "mnist", "MNIST idx(.gz): train-images.idx3-ubyte.gz, t10k-…")
def load_mnist(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    trx, try_ = formats.read_mnist(folder, "train")
    tex, tey = formats.read_mnist(folder, "test")
    return _finish("mnist", trx, try_, tex, tey, DIGITS, spec)


@register_domain("usps", "usps", "USPS: zip.train.gz/zip.test.gz (ESL) or usps.h5")
def load_usps(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    trx, try_ = formats.read_usps(folder, "train")
    tex, tey = formats.read_usps(folder, "test")
    return _finish("usps", trx, try_, tex, tey, DIGITS, spec)


@register_domain("mnist_m", "mnist_m", "MNIST-M: mnist_m_test/*.png + mnist_m_test_labels.txt, split 80/20")
def load_mnist_m(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    x, y = formats.read_mnist_m(folder)
    return _finish("mnist_m", *split_by_index(x, y), DIGITS, spec)


def _decode_part(entry: Path, part: str, files: list[Path], labels: np.ndarray, spec: InputSpec, name: str,
                 seed: int) -> None:
    """`files` in the fixed shuffled order of `seed`, decoded once at `spec` into entry/PART_x.npy (a map);
    unreadable files are left out with a warning naming each (all unreadable is an error)."""
    perm = np.random.default_rng(seed).permutation(len(files))
    files, labels = [files[i] for i in perm], labels[perm]
    path = entry / f"{part}_x.npy"
    bad = decode_into(path, files, spec, desc=f"{name} {part}")
    if bad:
        if len(bad) == len(files):
            raise EdgeguardError(f"{name}: none of the {len(files)} {part} images could be read (first: {files[0]})")
        log.warning("%s: %d unreadable image(s) left out of %s, e.g. %s", name, len(bad), part, files[bad[0]])
        keep = np.setdiff1d(np.arange(len(files)), bad)
        x = np.load(path, mmap_mode="r")[keep]
        np.save(path, x)
        labels = labels[keep]
    np.save(entry / f"{part}_y.npy", labels)


def load_imagefolder(folder: Path, name: str, spec: InputSpec, entry: Path) -> Domain:
    """FOLDER/train/CLASS/* and FOLDER/test/CLASS/* if both exist; else FOLDER/CLASS/* with a seeded,
    stratified 80/20 split (written to the cache entry's split.json). Files decode once, in workers."""
    parts = [p for p in ("train", "test") if (folder / p).is_dir()]
    if len(parts) == 1:  # else "train" (or "test") would become the domain's one class
        other = "test" if parts[0] == "train" else "train"
        raise EdgeguardError(f"{folder}: has {parts[0]}/ but no {other}/; give both ({folder}/train/CLASS/*, "
                             f"{folder}/test/CLASS/*), or put the class folders directly in {folder}")
    if len(parts) == 2:
        tr, te = list_image_folder(folder / "train"), list_image_folder(folder / "test")
        if te.classes != tr.classes:
            raise EdgeguardError(f"{folder}: train and test class folders differ")
        pieces = ((tr.files, tr.labels), (te.files, te.labels))
        classes = tr.classes
    else:
        fl = list_image_folder(folder)
        rel = fl.rel()
        test = stratified_split(rel, fl.labels)
        write_split(entry / "split.json", rel, test)
        pieces = (([f for f, t in zip(fl.files, test) if not t], fl.labels[~test]),
                  ([f for f, t in zip(fl.files, test) if t], fl.labels[test]))
        classes = fl.classes
    for (files, labels), part, seed in zip(pieces, ("train", "test"), (0, 1)):
        _decode_part(entry, part, files, labels, spec, name, seed)
    (entry / "classes.json").write_text(json.dumps(list(classes)))
    return _read_entry(name, entry)


@register_domain("cifar10", "cifar10", "CIFAR-10 as class folders: cifar10/test/CLASS/*.jpg (seeded stratified "
                 "80/20 split) or cifar10/{train,test}/CLASS/*")
def load_cifar10(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return load_imagefolder(folder, "cifar10", spec, entry)
    sub = folder / "test" if (folder / "test").is_dir() else folder
    return load_imagefolder(sub, "cifar10", spec, entry)


PACS_DOMAINS = {"pacs_photo": "photo", "pacs_art": "art_painting", "pacs_cartoon": "cartoon",
                "pacs_sketch": "sketch"}


def _pacs(name: str, sub: str) -> None:
    @register_domain(name, f"pacs/{sub}", f"PACS {sub}: pacs/{sub}/CLASS/*.jpg, 7 classes, 227 px (seeded "
                     "stratified 80/20 split)")
    def load(folder: Path, spec: InputSpec, entry: Path) -> Domain:
        return load_imagefolder(folder, name, spec, entry)


for _name, _sub in PACS_DOMAINS.items():
    _pacs(_name, _sub)


@register_domain("svhn", "svhn", "SVHN cropped digits: train_32x32.mat, test_32x32.mat")
def load_svhn(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    trx, try_ = formats.read_svhn(folder / "train_32x32.mat")
    tex, tey = formats.read_svhn(folder / "test_32x32.mat")
    return _finish("svhn", trx, try_, tex, tey, DIGITS, spec)


@register_domain("stl10", "stl10", "STL-10 binary: train_X.bin/train_y.bin, test_X.bin/test_y.bin "
                 "(its own class order)")
def load_stl10(folder: Path, spec: InputSpec, entry: Path) -> Domain:
    trx, try_ = formats.read_stl10(folder, "train")
    tex, tey = formats.read_stl10(folder, "test")
    return _finish("stl10", trx, try_, tex, tey, formats.STL10_CLASSES, spec)
