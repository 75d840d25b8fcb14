"""SSH connections and wall time per device for one `edgeguard deploy`, without and with connection sharing
(ControlMaster), against a loopback OpenSSH "device". Connections are counted from sshd's own log
("Accepted publickey" lines).

    python benchmarks/bench_deploy_ssh.py runs/prot.safetensors
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _record import record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a model file to bundle (any; the deploy is what is measured)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from converters.signing import generate_keypair
    from edgeguard.build import build
    from edgeguard.deploy import fleet, loopback
    from edgeguard.deploy.inventory import load_inventory
    from edgeguard.deploy.ssh import Device

    tmp = Path(tempfile.mkdtemp())
    key, pub = generate_keypair(tmp / "vendor")
    bundle = tmp / "bundle"
    build(a.model, bundle, target="cpu", sign_key=key, samples=50)
    lb = loopback.start(tmp / "lb")
    try:
        inv = tmp / "fleet.toml"
        inv.write_text(lb.inventory(python=sys.executable, names=("cam",)))
        devices = load_inventory(inv, Device(host=""))
        log = lb.dir / "sshd.log"
        rows = ["| connection sharing | ssh connections per deploy | wall per deploy | result |", "|---|---|---|---|"]
        for multiplex in (False, True):
            for i in range(a.repeats):
                before = log.read_text(errors="replace").count("Accepted publickey")
                t = time.perf_counter()
                opts = fleet.DeployOptions(force=True, public_key=str(pub), report_dir=tmp / "rep",
                                           multiplex=multiplex, bench_iterations=10)
                [res] = fleet.deploy(bundle, devices, opts)
                wall = time.perf_counter() - t
                time.sleep(0.5)
                n = log.read_text(errors="replace").count("Accepted publickey") - before
                rows.append(f"| {'ControlMaster' if multiplex else 'off (one per step)'} (run {i + 1}) | {n} | "
                            f"{wall:.2f} s | {res.result} |")
    finally:
        lb.stop()
    print("\n".join(rows))
    record("deploy: SSH connections per device", rows)


if __name__ == "__main__":
    main()
