"""Append a dated row to benchmarks/RESULTS.md with the machine it ran on and the command that made it."""
from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"  # EDGEGUARD_RESULTS: elsewhere (gpu_session --dry-run)


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        threads = torch.get_num_threads()
    except ImportError:
        threads = os.cpu_count()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch threads, {platform.python_version()}"


def record(section: str, lines: list[str]) -> None:
    cmd = "python " + " ".join(sys.argv)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n### {section} ({stamp})\n\nMachine: {machine()}. Command: `{cmd}`\n\n" + "\n".join(lines) + "\n"
    with open(os.environ.get("EDGEGUARD_RESULTS") or RESULTS, "a") as f:
        f.write(text)
    print(text)
