"""Build the `edgeguard-runtime` wheel from its own `runtime/pyproject.toml` with hatchling, offline.

The runtime lives in one place (`runtime/`, shared by host and device); the build copies that package and its
pyproject into a temporary project and calls hatchling's wheel builder in-process (no network, no pip). Builds
are reproducible (hatchling's reproducible mode with a fixed SOURCE_DATE_EPOCH): the same sources give the
same wheel bytes, so bundles stay byte-stable and devices can tell by hash whether their runtime is current.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import runtime
from runtime.fileio import atomic_write_bytes

DIST_NAME = "edgeguard-runtime"
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip can hold


def wheel_name(version: str | None = None) -> str:
    return f"{DIST_NAME.replace('-', '_')}-{version or runtime.__version__}-py3-none-any.whl"


def _project(tmp: Path) -> Path:
    src = Path(runtime.__file__).parent
    if not (src / "pyproject.toml").is_file():
        raise RuntimeError(f"{src}/pyproject.toml is missing: reinstall edgeguard (it carries the runtime's build "
                           "description)")
    proj = tmp / "project"
    shutil.copytree(src, proj / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "pyproject.toml"))
    shutil.copy(src / "pyproject.toml", proj / "pyproject.toml")
    return proj


def wheel_bytes() -> bytes:
    """The wheel of the installed `runtime` package, byte-reproducible."""
    from hatchling.builders.wheel import WheelBuilder

    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = SOURCE_DATE_EPOCH
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proj = _project(Path(tmp))
            out = Path(tmp) / "dist"
            built = list(WheelBuilder(str(proj)).build(directory=str(out), versions=["standard"]))
            return Path(built[0]).read_bytes()
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


def write_wheel(out_dir: str | os.PathLike) -> Path:
    """Write the wheel into `out_dir` (atomically) and return its path."""
    path = Path(out_dir) / wheel_name()
    atomic_write_bytes(path, wheel_bytes())
    return path
