"""Build the `edgeguard-runtime` wheel: the device runtime as its own pure-Python distribution, without torch.

Why a second distribution made here rather than a second pyproject: the runtime lives in one place
(`runtime/`, shared by host and device), and a wheel is a zip with three small metadata files, so we write
it directly. The result is reproducible (sorted entries, fixed timestamps): the same runtime sources give the
same wheel bytes, so bundles that carry it stay byte-stable and devices can tell by hash whether their
installed runtime is current. Install on a device with `pip install edgeguard_runtime-*.whl`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from pathlib import Path

import runtime
from runtime.fileio import atomic_write_bytes

DIST_NAME = "edgeguard-runtime"
#: What the device needs; torch and the host packages are deliberately absent.
REQUIRES = ["numpy>=1.24", "onnx>=1.15", "onnxruntime>=1.17", "cryptography>=41", "pillow>=9"]
EXTRAS = {"tensorrt": ["tensorrt>=10"]}
_EPOCH = (1980, 1, 1, 0, 0, 0)


def wheel_name(version: str | None = None) -> str:
    return f"{DIST_NAME.replace('-', '_')}-{version or runtime.__version__}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_files(root: Path) -> list[tuple[str, bytes]]:
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json"):
            files.append((f"runtime/{p.relative_to(root).as_posix()}", p.read_bytes()))
    return files


def wheel_bytes() -> bytes:
    """The wheel of the installed `runtime` package, byte-reproducible."""
    version = runtime.__version__
    dist = f"{DIST_NAME.replace('-', '_')}-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {DIST_NAME}", f"Version: {version}",
            "Summary: edgeguard device runtime: verify signed bundles and measure them (no PyTorch)",
            "Requires-Python: >=3.8"]
    meta += [f"Requires-Dist: {r}" for r in REQUIRES]
    for extra, reqs in EXTRAS.items():
        meta.append(f"Provides-Extra: {extra}")
        meta += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    entries = _package_files(Path(runtime.__file__).parent)
    entries += [
        (f"{dist}/METADATA", ("\n".join(meta) + "\n").encode()),
        (f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgeguard converters\nRoot-Is-Purelib: true\n"
                          b"Tag: py3-none-any\n"),
        (f"{dist}/entry_points.txt", b"[console_scripts]\nedgeguard-runtime = runtime.cli:main\n"),
        (f"{dist}/top_level.txt", b"runtime\n"),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist}/RECORD,,\n"
    entries.append((f"{dist}/RECORD", record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def write_wheel(out_dir: str | os.PathLike) -> Path:
    """Write the wheel into `out_dir` (atomically) and return its path."""
    path = Path(out_dir) / wheel_name()
    atomic_write_bytes(path, wheel_bytes())
    os.chmod(path, 0o644)
    return path
