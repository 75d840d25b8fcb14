"""benchmarks/gpu_session.sh cannot rot between GPU sessions: its --dry-run runs every step on the CPU with
tiny settings (small_cnn on the embedded samples), and every step must succeed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_session_dry_run_runs_every_step(tmp_path):
    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "R": str(tmp_path / "r"), "HOME": str(tmp_path)}
    pacs = Path(os.environ.get("EDGEGUARD_DATA_ROOT", "/nonexistent")) / "pacs" / "photo"
    if pacs.is_dir():  # the camera step needs PACS; without it the step says so and is skipped
        env["EDGEGUARD_DATA_ROOT"] = os.environ["EDGEGUARD_DATA_ROOT"]
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    steps = [line for line in log.splitlines() if line.startswith("=== t=")]
    assert len(steps) >= 9 and "=== SKIP (" not in log, log[-3000:]
    dry = (tmp_path / "out" / "RESULTS.dry-run.md").read_text()
    sections = ["Training throughput", "Attack grid wall time", "NTP protection", "MAP protection", "Hardening"]
    for section in sections + (["MAP source-free on PACS"] if pacs.is_dir()
                               else []):
        assert section in dry, section
    assert results.read_bytes() == before  # a dry run never writes the project's record
