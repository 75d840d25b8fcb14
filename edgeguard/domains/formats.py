"""Readers for the standard on-disk formats. Each returns raw uint8 images and int64 labels, or raises
EdgeguardError naming the path and what was expected there."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import EdgeguardError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise EdgeguardError(f"{path}: not found; expected {what}. Set --data-root or EDGEGUARD_DATA_ROOT "
                             "to the folder that holds the data sets.")
    return path


def _first_existing(folder: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return _need(folder / names[0], what)


def _open_maybe_gz(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                return g.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise EdgeguardError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None


def read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """An IDX file (MNIST), gzipped or not: magic 0x0000 08 ndim, big-endian sizes, uint8 payload."""
    data = _open_maybe_gz(_need(path, "an IDX file (MNIST format)"))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expect_ndim:
        raise EdgeguardError(f"{path}: not an IDX uint8 file with {expect_ndim} dimensions (bad magic number)")
    dims = struct.unpack(f">{expect_ndim}I", data[4 : 4 + 4 * expect_ndim])
    start = 4 + 4 * expect_ndim
    size = int(np.prod(dims))
    if len(data) - start != size:
        raise EdgeguardError(f"{path}: header says {dims} ({size} bytes of data) but the file holds "
                             f"{len(data) - start}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def read_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    names = lambda kind, nd: [f"{prefix}-{kind}.idx{nd}-ubyte.gz", f"{prefix}-{kind}-idx{nd}-ubyte.gz",  # noqa: E731
                              f"{prefix}-{kind}.idx{nd}-ubyte", f"{prefix}-{kind}-idx{nd}-ubyte"]
    x = read_idx(_first_existing(folder, names("images", 3), "MNIST images (IDX)"), 3)
    y = read_idx(_first_existing(folder, names("labels", 1), "MNIST labels (IDX)"), 1)
    if len(x) != len(y):
        raise EdgeguardError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
    return x, y.astype(np.int64)


def read_usps(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """USPS from the ESL `zip.train.gz`/`zip.test.gz` (label then 256 values in [-1, 1]) or `usps.h5`."""
    zname = folder / f"zip.{split}.gz"
    if not zname.exists() and (folder / f"zip.{split}").exists():
        zname = folder / f"zip.{split}"
    if zname.exists():
        text = _open_maybe_gz(zname).decode("ascii", errors="replace")
        try:
            rows = np.array([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()])
        except ValueError:
            raise EdgeguardError(f"{zname}: expected lines of a label and 256 numbers") from None
        if rows.ndim != 2 or rows.shape[1] != 257:
            raise EdgeguardError(f"{zname}: expected 257 values per line (label + 16x16 pixels), "
                                 f"got {rows.shape[-1] if rows.ndim == 2 else 'ragged lines'}")
        x = np.clip(np.round((rows[:, 1:] + 1.0) * 127.5), 0, 255).astype(np.uint8).reshape(-1, 16, 16)
        return x, rows[:, 0].astype(np.int64)
    h5 = _need(folder / "usps.h5", f"zip.{split}.gz or usps.h5 (USPS)")
    try:
        import h5py

        with h5py.File(h5, "r") as f:
            data = np.asarray(f[split]["data"], dtype=np.float32)
            target = np.asarray(f[split]["target"]).astype(np.int64)
    except (OSError, KeyError) as e:
        raise EdgeguardError(f"{h5}: expected HDF5 with {split}/data and {split}/target ({e})") from None
    x = np.clip(np.round(data * 255.0), 0, 255).astype(np.uint8).reshape(-1, 16, 16)
    return x, target


def _load_image(path: Path) -> np.ndarray:
    """An MNIST-M PNG (32×32 RGB), HWC."""
    from runtime.imagefile import ImageFileError, decode_image

    try:
        return decode_image(path, (3, 32, 32)).transpose(1, 2, 0)
    except ImageFileError as e:
        raise EdgeguardError(str(e)) from None


def read_mnist_m(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M: `mnist_m_test/*.png` with `mnist_m_test_labels.txt` (lines `00000000.png 7`)."""
    labels_file = _need(folder / "mnist_m_test_labels.txt", "MNIST-M labels (lines 'NAME.png LABEL')")
    images_dir = _need(folder / "mnist_m_test", "a folder of MNIST-M PNG images")
    names, labels = [], []
    for i, line in enumerate(labels_file.read_text().splitlines()):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise EdgeguardError(f"{labels_file}:{i + 1}: expected 'NAME.png LABEL', got {line!r}")
        names.append(parts[0])
        labels.append(int(parts[1]))
    x = np.stack([_load_image(images_dir / n).transpose(2, 0, 1) for n in names]) if names else \
        np.zeros((0, 3, 32, 32), np.uint8)
    return x, np.asarray(labels, dtype=np.int64)


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits `*_32x32.mat`: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 where 10 means 0."""
    _need(path, "an SVHN *_32x32.mat file")
    try:
        from scipy.io import loadmat

        m = loadmat(str(path))
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
    except Exception as e:  # scipy raises several types for bad files
        raise EdgeguardError(f"{path}: not an SVHN .mat file with X and y ({e})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise EdgeguardError(f"{path}: X must be (32, 32, 3, N) matching y, got {x.shape} and {y.shape}")
    y = np.where(y == 10, 0, y)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y


def read_stl10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binary: `{split}_X.bin` column-major uint8 96x96x3, `{split}_y.bin` labels 1..10."""
    xp = _need(folder / f"{split}_X.bin", "STL-10 images (uint8 N*3*96*96, column-major)")
    yp = _need(folder / f"{split}_y.bin", "STL-10 labels (uint8 1..10)")
    raw = np.fromfile(xp, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise EdgeguardError(f"{xp}: size {raw.size} is not a multiple of 3*96*96; the file is truncated")
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    y = np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1
    if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise EdgeguardError(f"{yp}: expected {len(x)} labels in 1..10")
    return np.ascontiguousarray(x), y


STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
