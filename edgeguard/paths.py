"""Output paths checked before any compute: a run that can only fail at its end (a read-only folder, a file
where a folder should be) is refused in one line at its start, and a report folder a failed run created is
removed again."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import EdgeguardError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and remove a file in `folder` (the only test that also holds for root and read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".edgeguard-probe-"):
            pass
    except OSError as e:
        why = "read-only" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (e.strerror or str(e))
        raise EdgeguardError(f"{option} {path}: cannot write in {folder} ({why}); choose a folder you can "
                             "write to") from None


def ensure_writable(path: str | os.PathLike, option: str, folder: bool = False) -> Path:
    """Check that `path` (a file, or with `folder` a folder) can be written, creating nothing but a probe
    file: its nearest existing ancestor must be a writable folder, and an existing path must be of the
    right kind. Returns the path."""
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise EdgeguardError(f"{option} {p}: exists and is not a folder; choose another {option}")
        if not folder and p.is_dir():
            raise EdgeguardError(f"{option} {p}: is a folder; give a file name")
        _probe(p if folder else p.parent, option, p)
        return p
    base = _nearest_existing(p.parent if not folder else p)
    if not base.is_dir():
        raise EdgeguardError(f"{option} {p}: {base} is a file, so nothing can be written under it; choose "
                             f"another {option}")
    _probe(base, option, p)
    return p


def has_completed_runs(report_dir: Path) -> bool:
    log = report_dir / "runs.jsonl"
    try:
        return log.is_file() and log.stat().st_size > 0
    except OSError:
        return False


@contextlib.contextmanager
def report_folder(path: str | os.PathLike, keep: Callable[[Path], bool] = has_completed_runs) -> Iterator[Path]:
    """Create `path` if needed; if the body fails and this call created it, remove it again unless `keep`
    says it holds work to resume from (then the user reruns the same command)."""
    p = Path(path)
    created = not p.exists()
    p.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    except BaseException:
        if created and not keep(p):
            shutil.rmtree(p, ignore_errors=True)
        raise
