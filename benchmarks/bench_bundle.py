"""Bundle size (model.onnx and its zip-compressed form) and ONNX Runtime CPU latency, dense vs protected."""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

from _record import record

from edgeguard.build import build
from runtime.backends import get_backend
from runtime.manifest import load_manifest
from runtime.measure import latency


def zipped(path: Path) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(path, path.name)
    return len(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="artifact files (dense and protected)")
    ap.add_argument("--out", default="runs/bench_bundles")
    a = ap.parse_args()
    rows = ["| model | method | sparsity | model.onnx bytes | zipped bytes | p50 ms b=1 | images/s b=32 |",
            "|---|---|---|---|---|---|---|"]
    for m in a.models:
        out = Path(a.out) / Path(m).stem
        build(m, out, samples=50)
        man, _ = load_manifest(out)
        be = get_backend("onnxruntime", out / "model.onnx")
        l1, l32 = latency(be, man.input, 1, 200), latency(be, man.input, 32, 50)
        rows.append(f"| {Path(m).name} | {man.method} | {man.mask.sparsity * 100:.1f}% | "
                    f"{(out / 'model.onnx').stat().st_size:,} | {zipped(out / 'model.onnx'):,} | "
                    f"{l1['p50_ms']:.3f} | {l32['throughput_ips']:,.0f} |")
    record("Bundle size and ONNX Runtime CPU latency", rows)


if __name__ == "__main__":
    main()
