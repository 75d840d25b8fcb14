"""Image folders at scale: files listed once, a seeded stratified split for folders that come in one part
(persisted beside the cache), and one decode per file at the model's input, in worker processes, straight
into memory-mapped uint8 arrays. Epochs then read batches from the map; no file is decoded twice."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.imagefile import ImageFileError, decode_image

from ..errors import EdgeguardError
from ..inputspec import InputSpec
from ..progress import progress
from .formats import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CHUNK = 256  # files per worker task


@dataclass
class FileList:
    """An ImageFolder's files (sorted by class, then name), their labels and the class names."""

    root: Path
    files: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]

    def rel(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.files]


def list_image_folder(folder: Path) -> FileList:
    """The ImageFolder layout: one sub-folder per class (sorted names), image files inside."""
    if not folder.is_dir():
        raise EdgeguardError(f"{folder}: not found; expected a folder with one sub-folder of images per class")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise EdgeguardError(f"{folder}: no class sub-folders; expected FOLDER/CLASS_NAME/IMAGE files")
    files, labels = [], []
    for ci, c in enumerate(classes):
        found = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise EdgeguardError(f"{folder / c}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                 "add its images or remove the folder (a model would silently lose the class)")
        files += found
        labels += [ci] * len(found)
    return FileList(folder, files, np.asarray(labels, np.int64), classes)


def stratified_split(rel_paths: list[str], labels: np.ndarray, seed: int = SPLIT_SEED,
                     test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean test mask: in each class, the round(fraction·n) files that come first when ordered by
    sha256(seed:path). It depends only on the names, so every machine draws the same split."""
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = sorted(idx, key=lambda i: hashlib.sha256(f"{seed}:{rel_paths[i]}".encode()).hexdigest())
        k = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        test[order[:k]] = True
    return test


def write_split(path: Path, rel_paths: list[str], test: np.ndarray, seed: int = SPLIT_SEED) -> None:
    from runtime.fileio import atomic_write_text

    atomic_write_text(path, json.dumps({"seed": seed, "test_fraction": TEST_FRACTION, "rule": "per class, the "
                                        "first round(fraction*n) files by sha256(seed:relative path)",
                                        "test": [p for p, t in zip(rel_paths, test) if t]}, indent=0))


def _decode_chunk(args: tuple) -> list[int]:
    """Worker: decode files[i] into rows start+i of the map; returns the rows whose file is unreadable."""
    out_path, start, paths, spec = args
    out = np.load(out_path, mmap_mode="r+")
    bad = []
    for i, p in enumerate(paths):
        try:
            out[start + i] = decode_image(p, spec.shape, spec.resize, spec.crop)
        except ImageFileError as e:
            log.warning("%s", e)
            bad.append(start + i)
    out.flush()
    return bad


def workers_for(n_files: int) -> int:
    return max(1, min(4, os.cpu_count() or 1, n_files // CHUNK + 1))


def decode_into(out_path: Path, files: list[Path], spec: InputSpec, desc: str = "decode") -> list[int]:
    """Decode `files` at `spec` into a new .npy map at `out_path` (N×C×H×W uint8); the indices of files that
    could not be read come back (their rows stay zero)."""
    arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(files), *spec.shape))
    del arr
    tasks = [(out_path, s, [str(p) for p in files[s : s + CHUNK]], spec) for s in range(0, len(files), CHUNK)]
    bad: list[int] = []
    workers = workers_for(len(files))
    bar = progress(None, desc=f"{desc} ({workers} worker{'s' * (workers > 1)})", total=len(files))
    if workers == 1:
        results = map(_decode_chunk, tasks)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        results = pool.map(_decode_chunk, tasks)
    try:
        for t, b in zip(tasks, results):
            bad += b
            bar.update(len(t[2]))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown()
    return bad
