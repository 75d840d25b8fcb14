"""Fuzz the device runtime and the model loader: N mutated manifests (half re-signed with the vendor key, so
the strict parser and the file checks are what must hold) and N/5 mutated model cards. A crash is any
exception that escapes, or an error that is not one line. Records the counts in RESULTS.md.

    python benchmarks/bench_fuzz.py --n 10000 --seed 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import struct
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from _record import record
from fuzz_mutations import KINDS, VALUES, mutate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    from converters.signing import generate_keypair, sign
    from edgeguard.artifact import load_artifact
    from edgeguard.build import build
    from edgeguard.errors import EdgeguardError
    from edgeguard.protect import protect
    from edgeguard.source import train_source
    from runtime.cli import main as runtime_main

    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "src.safetensors"
    train_source("small_cnn", "mnist_sample", src, epochs=1, device="cpu")
    prot = tmp / "prot.safetensors"
    protect("magnitude", src, prot, target="usps_sample", device="cpu")
    key, pub = generate_keypair(tmp / "vendor")
    bundle = tmp / "bundle"
    build(prot, bundle, target="cpu", sign_key=key, samples=20)
    work = tmp / "work"
    shutil.copytree(bundle, work)
    original = (bundle / "manifest.json").read_bytes()
    codes, crashes, multi = Counter(), [], 0
    t0 = time.perf_counter()
    for i in range(a.n):
        kind, pick, value = rng.choice(KINDS), rng.randrange(10**6), rng.choice(VALUES)
        raw = mutate(original, kind, pick, value)
        resign = i % 2 == 0
        (work / "manifest.json").write_bytes(raw)
        if resign:
            (work / "manifest.sig").write_bytes(sign(raw, key))
        argv = ["validate", str(work)] + (["--public-key", str(pub)] if resign else ["--allow-unsigned"])
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = runtime_main(argv)
            codes[code] += 1
            if code and len(err.getvalue().strip().splitlines()) != 1:
                multi += 1
        except BaseException:  # noqa: BLE001 — counting crashes is the point
            crashes.append((kind, pick, traceback.format_exc().strip().splitlines()[-1]))
        shutil.copy(bundle / "manifest.sig", work / "manifest.sig")
    manifest_s = time.perf_counter() - t0

    data = prot.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    from safetensors.torch import load, save

    state = load(data)
    card_crashes, card_codes = [], Counter()
    for _ in range(a.n // 5):
        kind = rng.choice([k for k in KINDS if k not in ("bytes", "truncate")])
        md = dict(header["__metadata__"])
        md["edgeguard"] = mutate(md["edgeguard"].encode(), kind, rng.randrange(10**6),
                                 rng.choice(VALUES)).decode("utf-8", "surrogatepass")
        path = tmp / "m.safetensors"
        try:
            path.write_bytes(save(state, metadata=md))
        except Exception:  # noqa: BLE001 — safetensors refuses to write it: nothing to load
            card_codes["unwritable"] += 1
            continue
        try:
            load_artifact(path)
            card_codes["loaded"] += 1
        except EdgeguardError as e:
            card_codes["refused"] += 1
            if "\n" in str(e):
                card_crashes.append((kind, "multi-line message"))
        except BaseException:  # noqa: BLE001
            card_crashes.append((kind, traceback.format_exc().strip().splitlines()[-1]))
    shutil.rmtree(tmp, ignore_errors=True)
    rows = ["| what | mutations | exit 0 / 1 / 2 | crashes | multi-line errors | wall |", "|---|---|---|---|---|---|",
            f"| bundle manifest (`edgeguard-runtime validate`, half re-signed) | {a.n} | {codes[0]} / {codes[1]} / "
            f"{codes[2]} | **{len(crashes)}** | {multi} | {manifest_s:.0f} s |",
            f"| model card (`load_artifact`) | {a.n // 5} | loaded {card_codes['loaded']}, refused "
            f"{card_codes['refused']}, unwritable {card_codes['unwritable']} | **{len(card_crashes)}** | – | |"]
    for c in (crashes + card_crashes)[:10]:
        rows.append(f"- crash: {c}")
    print("\n".join(rows))
    record("Fuzz: mutated manifests and model cards", rows)


if __name__ == "__main__":
    main()
