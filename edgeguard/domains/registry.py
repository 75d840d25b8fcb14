"""The domain registry: a name → loader map, the data-root lookup and an on-disk cache of decoded arrays."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import cache
from ..errors import EdgeguardError
from . import formats
from .base import DIGITS, Domain, fixed_shuffle, split_by_index, to_rgb32
from .classes import align_classes

Loader = Callable[[Path], Domain]


@dataclass(frozen=True)
class DomainSpec:
    name: str
    folder: str  # sub-folder of the data root ("" for embedded domains)
    description: str
    loader: Loader


_REGISTRY: dict[str, DomainSpec] = {}
_MEMO: dict[tuple[str, str, str], Domain] = {}  # (name, folder, fingerprint): an edited folder is reread


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


def _cached(name: str, fingerprint: str, build: Callable[[], Domain]) -> Domain:
    path = _cache_dir() / f"{name.replace(':', '_').replace('/', '_')}-{fingerprint}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Domain(name, z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                              tuple(str(c) for c in z["classes"]))
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    dom = build()
    try:
        from runtime.fileio import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, train_x=dom.train_x, train_y=dom.train_y, test_x=dom.test_x,
                         test_y=dom.test_y, classes=np.asarray(dom.classes))
    except OSError:
        pass  # a read-only home only costs speed
    return dom


def get_domain(name: str, data_root: str | os.PathLike | None = None, *, classes=None, class_map=None,
               role: str = "target") -> Domain:
    """Load a registered domain (or `imagefolder:PATH`) as uint8 (N, 3, 32, 32) images and int64 labels.
    With `classes` (a model's class names) the labels are matched to them by name (`domains.classes`)."""
    dom = _load_domain(name, data_root)
    return dom if classes is None else align_classes(dom, classes, class_map, role)


def _load_domain(name: str, data_root: str | os.PathLike | None) -> Domain:
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            where = "" if folder.is_absolute() else f" (relative to the current folder {Path.cwd()})"
            raise EdgeguardError(f"{name}: {folder} is {'not a folder' if folder.exists() else 'not found'}{where}; "
                                 "give the path of a folder with one sub-folder of images per class")
        key = (name, str(folder.resolve()), _fingerprint(folder))
        if key not in _MEMO:
            _MEMO[key] = _cached(name, key[2], lambda: load_imagefolder(folder, name))
        return _MEMO[key]
    spec = _REGISTRY.get(name)
    if spec is None:
        known = ", ".join(sorted(_REGISTRY)) + ", imagefolder:PATH"
        raise EdgeguardError(f"unknown domain {name!r}; known domains: {known}")
    if not spec.folder:
        key = (name, "", "")
        if key not in _MEMO:
            _MEMO[key] = spec.loader(Path())
        return _MEMO[key]
    root = resolve_data_root(data_root)
    if root is None:
        raise EdgeguardError(f"domain {name!r} needs a data root: pass --data-root DIR or set EDGEGUARD_DATA_ROOT "
                             f"(DIR/{spec.folder} must hold it); the embedded samples need none: "
                             f"{', '.join(s.name for s in list_domains() if not s.folder)}")
    folder = root / spec.folder
    if not folder.exists():
        raise EdgeguardError(f"{folder}: not found; expected the {name} data set there ({spec.description})")
    key = (name, str(folder.resolve()), _fingerprint(folder))
    if key not in _MEMO:
        _MEMO[key] = _cached(name, key[2], lambda: spec.loader(folder))
    return _MEMO[key]


def _finish(name: str, trx, try_, tex, tey, classes) -> Domain:
    trx, try_ = fixed_shuffle(to_rgb32(trx), np.asarray(try_, np.int64), seed=0)
    tex, tey = fixed_shuffle(to_rgb32(tex), np.asarray(tey, np.int64), seed=1)
    for y, part in ((try_, "train"), (tey, "test")):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise EdgeguardError(f"{name}: {part} labels outside 0..{len(classes) - 1}")
    return Domain(name, trx, try_, tex, tey, tuple(classes))


@register_domain("mnist", "mnist", "MNIST idx(.gz): train-images.idx3-ubyte.gz, t10k-…")
def load_mnist(folder: Path) -> Domain:
    trx, try_ = formats.read_mnist(folder, "train")
    tex, tey = formats.read_mnist(folder, "test")
    return _finish("mnist", trx, try_, tex, tey, DIGITS)


@register_domain("usps", "usps", "USPS: zip.train.gz/zip.test.gz (ESL) or usps.h5")
def load_usps(folder: Path) -> Domain:
    trx, try_ = formats.read_usps(folder, "train")
    tex, tey = formats.read_usps(folder, "test")
    return _finish("usps", trx, try_, tex, tey, DIGITS)


@register_domain("mnist_m", "mnist_m", "MNIST-M: mnist_m_test/*.png + mnist_m_test_labels.txt, split 80/20")
def load_mnist_m(folder: Path) -> Domain:
    x, y = formats.read_mnist_m(folder)
    return _finish("mnist_m", *split_by_index(x, y), DIGITS)


def load_imagefolder(folder: Path, name: str) -> Domain:
    """FOLDER/train/CLASS/* and FOLDER/test/CLASS/* if both exist; else FOLDER/CLASS/* split 80/20 by index."""
    parts = [p for p in ("train", "test") if (folder / p).is_dir()]
    if len(parts) == 1:  # else "train" (or "test") would become the domain's one class
        other = "test" if parts[0] == "train" else "train"
        raise EdgeguardError(f"{folder}: has {parts[0]}/ but no {other}/; give both ({folder}/train/CLASS/*, "
                             f"{folder}/test/CLASS/*), or put the class folders directly in {folder}")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        trx, try_, classes = formats.read_image_folder(folder / "train")
        tex, tey, test_classes = formats.read_image_folder(folder / "test")
        if test_classes != classes:
            raise EdgeguardError(f"{folder}: train and test class folders differ")
        return _finish(name, trx, try_, tex, tey, classes)
    x, y, classes = formats.read_image_folder(folder)
    return _finish(name, *split_by_index(x, y), classes)


@register_domain("cifar10", "cifar10", "CIFAR-10 as class folders: cifar10/test/CLASS/*.jpg (split 80/20) "
                 "or cifar10/{train,test}/CLASS/*")
def load_cifar10(folder: Path) -> Domain:
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return load_imagefolder(folder, "cifar10")
    sub = folder / "test" if (folder / "test").is_dir() else folder
    return load_imagefolder(sub, "cifar10")


@register_domain("svhn", "svhn", "SVHN cropped digits: train_32x32.mat, test_32x32.mat")
def load_svhn(folder: Path) -> Domain:
    trx, try_ = formats.read_svhn(folder / "train_32x32.mat")
    tex, tey = formats.read_svhn(folder / "test_32x32.mat")
    return _finish("svhn", trx, try_, tex, tey, DIGITS)


@register_domain("stl10", "stl10", "STL-10 binary: train_X.bin/train_y.bin, test_X.bin/test_y.bin "
                 "(its own class order)")
def load_stl10(folder: Path) -> Domain:
    trx, try_ = formats.read_stl10(folder, "train")
    tex, tey = formats.read_stl10(folder, "test")
    return _finish("stl10", trx, try_, tex, tey, formats.STL10_CLASSES)
