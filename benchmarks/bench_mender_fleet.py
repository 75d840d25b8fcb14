"""A loopback fleet of Mender devices (the real mender-client 3.4 in standalone mode, one data folder each):
devices updated per minute (`mender install` of an edgeguard Mender Artifact, on-device validation, then
`mender commit`) and the bytes moved per device, then the fault cases on one device each: a tampered
artifact, a bundle that fails validation, a second install of the same version.

    python benchmarks/bench_mender_fleet.py MODEL.safetensors --devices 10 --jobs 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _record import record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a model file to bundle (the update is what is measured)")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="devices updating at once")
    ap.add_argument("--samples", type=int, default=200, help="validation samples per domain in the bundle")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    from converters.signing import generate_keypair, generate_ota_keypair
    from edgeguard.build import OtaOptions, build
    from edgeguard.deploy import mender_loopback as ml

    reason = ml.missing()
    if reason:
        raise SystemExit(f"cannot run loopback Mender devices here: {reason}")
    ml.prepare_host()
    tmp = Path(tempfile.mkdtemp(prefix="mender-fleet-"))
    key, pub = generate_keypair(tmp / "vendor")
    other, _ = generate_keypair(tmp / "other")
    ota_key, ota_pub = generate_ota_keypair(tmp / "vendor")
    r = build(a.model, tmp / "bundle", target="cpu", sign_key=key, samples=a.samples, allow_weak=True,
              ota=OtaOptions(["edgeguard-loopback"], str(ota_key)))
    art = Path(r["ota"]["artifact"])
    devs = [ml.make_device(tmp / f"dev{i:02d}", "edgeguard-loopback", ota_pub, pub) for i in range(a.devices)]

    def update(d) -> tuple[bool, float]:
        t = time.perf_counter()
        ok = d.install(art).returncode == 0 and d.commit().returncode == 0
        return ok and d.status()["current"] is not None, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.jobs) as ex:
        results = list(ex.map(update, devs))
    wall = time.perf_counter() - t0
    ok = sum(r[0] for r in results)
    per = sorted(r[1] for r in results)

    # fault cases on the first device (it runs the bundle installed above)
    d = devs[0]
    good = d.status()
    bad = bytearray(art.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (tmp / "tampered.mender").write_bytes(bytes(bad))
    tampered_refused = d.install(tmp / "tampered.mender").returncode != 0 and d.status() == good
    rx = build(a.model, tmp / "bundle-x", target="cpu", sign_key=other, samples=a.samples, allow_weak=True,
               ota=OtaOptions(["edgeguard-loopback"], str(ota_key)))
    failing_rolled_back = d.install(rx["ota"]["artifact"]).returncode != 0 and d.status() == good
    noop = d.install(art).returncode == 0 and d.commit().returncode == 0 and d.status() == good

    lines = ["| devices | jobs | updated | wall | devices/minute | per device p50 / max | bytes moved per device |",
             "|---|---|---|---|---|---|---|",
             f"| {a.devices} | {a.jobs} | {ok}/{a.devices} | {wall:.1f} s | {ok / wall * 60:.1f} | "
             f"{per[len(per) // 2]:.2f} / {per[-1]:.2f} s | {art.stat().st_size:,} (the artifact) |",
             "", f"Fault cases on one device: tampered artifact refused, old bundle current: {tampered_refused}; "
                 f"bundle failing validation rolled back, old bundle current: {failing_rolled_back}; second install "
                 f"of the same version a no-op: {noop}."]
    if a.no_record:
        print("\n".join(lines))
    else:
        record("Mender loopback fleet (issue 33)", lines)


if __name__ == "__main__":
    main()
