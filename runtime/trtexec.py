"""NVIDIA's own latency numbers: `trtexec --loadEngine … --exportTimes` beside the Python-side timings.

trtexec splits each inference's host latency into H2D copy, GPU compute and D2H copy (with CUDA graphs, as
NVIDIA users read it). NOT RUN here (no TensorRT on this project's machines); the command line and the
parsing of its times file are tested with a stand-in `trtexec`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .manifest import BundleError

JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # where JetPack puts it (not on PATH by default)


def trtexec_path() -> str | None:
    found = shutil.which("trtexec")
    if found:
        return found
    return JETSON_TRTEXEC if Path(JETSON_TRTEXEC).is_file() else None


def load_command(trtexec: str, engine: Path, input_name: str, shape: tuple[int, ...], iterations: int,
                 times_file: Path, cuda_graph: bool = True) -> list[str]:
    dims = "x".join(str(d) for d in shape)
    cmd = [trtexec, f"--loadEngine={engine}", f"--shapes={input_name}:{dims}", f"--iterations={iterations}",
           "--warmUp=200", "--duration=0", f"--exportTimes={times_file}"]
    if cuda_graph:
        cmd.append("--useCudaGraph")
    return cmd


def summarise_times(records: list[dict]) -> dict:
    """Mean / p50 / p95 (ms) of each part of trtexec's per-inference record."""
    if not isinstance(records, list) or not records:
        raise BundleError("trtexec wrote no timing records")
    out = {"inferences": len(records)}
    for key, name in (("h2dMs", "h2d"), ("computeMs", "compute"), ("d2hMs", "d2h"), ("latencyMs", "latency")):
        vals = np.asarray([float(r[key]) for r in records if isinstance(r, dict) and key in r])
        if len(vals):
            out[name] = {"mean_ms": float(vals.mean()), "p50_ms": float(np.percentile(vals, 50)),
                         "p95_ms": float(np.percentile(vals, 95))}
    return out


def trtexec_bench(engine: Path, input_name: str, shape: tuple[int, ...], iterations: int = 100,
                  timeout: float = 600) -> dict:
    """Run trtexec on the engine; {"available": False, "reason"} where there is none."""
    exe = trtexec_path()
    if exe is None:
        return {"available": False, "reason": "trtexec not found (PATH, /usr/src/tensorrt/bin): Python-side "
                                              "timings only"}
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        cmd = load_command(exe, engine, input_name, shape, iterations, times)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"available": False, "reason": f"trtexec could not run ({type(e).__name__})"}
        if r.returncode != 0 or not times.exists():
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"available": False, "reason": f"trtexec failed: {last[0][:200]}"}
        try:
            records = json.loads(times.read_text())
        except (OSError, ValueError):
            return {"available": False, "reason": "trtexec's times file is not JSON"}
    return {"available": True, "command": " ".join(cmd[:1] + [c for c in cmd[1:] if not c.startswith("--exportTimes")]),
            **summarise_times(records)}
