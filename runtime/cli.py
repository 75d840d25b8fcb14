"""`edgeguard-runtime validate | bench | predict`: the device side (argparse: no host dependencies).

Exit codes: 0 every check passed, 1 a check failed, 2 bad input (missing file, bad JSON, wrong key).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .fileio import atomic_write_text
from .manifest import BundleError, IntegrityError


def _backend(args, manifest, bundle: Path):
    from .backends import get_backend

    return get_backend(args.backend, bundle / manifest.model.path, Path(args.engine) if args.engine else None,
                       input_name=manifest.input.input_name, output_name=manifest.input.output_name)


def cmd_validate(args) -> int:
    from .integrity import verify_bundle
    from .measure import accuracy, load_validation

    bundle = Path(args.bundle)
    report: dict = {"bundle": str(bundle), "checks": [], "ok": False}
    try:
        manifest, checks = verify_bundle(bundle, args.public_key, args.engine, require_signature=not args.allow_unsigned)
        report["checks"] = [c.__dict__ for c in checks]
        backend = _backend(args, manifest, bundle)
        report["backend"] = backend.describe()
        failures = []
        results = []
        for dc, role in [(manifest.authorised, "authorised")] + [(u, "unauthorised") for u in manifest.unauthorised]:
            x, y = load_validation(bundle / dc.file)
            acc = accuracy(backend, x, y, manifest.input)
            row = {"domain": dc.name, "role": role, "samples": int(len(y)), "accuracy": acc,
                   "host_accuracy": dc.accuracy, "min_accuracy": dc.min_accuracy, "max_accuracy": dc.max_accuracy}
            if dc.min_accuracy is not None and acc < dc.min_accuracy:
                failures.append(f"accuracy: authorised {dc.name} {acc * 100:.2f}% is below the bound "
                                f"{dc.min_accuracy * 100:.2f}%")
            if dc.max_accuracy is not None and acc > dc.max_accuracy:
                failures.append(f"accuracy: unauthorised {dc.name} {acc * 100:.2f}% is above the ceiling "
                                f"{dc.max_accuracy * 100:.2f}%")
            results.append(row)
        report["accuracy"] = results
        report["ok"] = not failures
        report["failures"] = failures
        code = 0 if not failures else 1
    except BundleError as e:
        report["error"] = str(e)
        report["exit_code"] = e.exit_code
        _write(args, report)
        print(f"FAILED: {e}", file=sys.stderr)
        return e.exit_code
    _write(args, report)
    for c in report["checks"]:
        print(f"  ok    {c['name']:<12} {c['detail']}")
    for r in report["accuracy"]:
        bound = (f"≥ {r['min_accuracy'] * 100:.1f}%" if r["min_accuracy"] is not None else
                 f"≤ {r['max_accuracy'] * 100:.1f}%" if r["max_accuracy"] is not None else "")
        print(f"  {'ok' if not any(r['domain'] in f for f in failures) else 'FAIL':<5} {r['role']:<12} "
              f"{r['domain']}: {r['accuracy'] * 100:.2f}% on {r['samples']} samples {bound}")
    print(("PASSED" if code == 0 else "FAILED: " + "; ".join(failures)) + f"  ({report['backend']['backend']})")
    return code


def _write(args, report: dict) -> None:
    if getattr(args, "report", None):
        atomic_write_text(args.report, json.dumps(report, indent=2))


def cmd_bench(args) -> int:
    from .manifest import load_manifest
    from .measure import latency

    bundle = Path(args.bundle)
    manifest, _ = load_manifest(bundle)
    backend = _backend(args, manifest, bundle)
    rows = [latency(backend, manifest.input, b, args.iterations, args.warmup) for b in (1, args.batch)]
    result = {"backend": backend.describe(), "results": rows}
    _write(args, result)
    print(f"{'batch':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'images/s':>10}   ({result['backend']['backend']})")
    for r in rows:
        print(f"{r['batch']:>6} {r['p50_ms']:>9.3f} {r['p95_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['throughput_ips']:>10.0f}")
    return 0


def cmd_predict(args) -> int:
    from .manifest import load_manifest
    from .measure import load_images, preprocess, softmax

    bundle = Path(args.bundle)
    manifest, _ = load_manifest(bundle)
    x = load_images(args.images, manifest.input)
    backend = _backend(args, manifest, bundle)
    probs = softmax(backend.run(preprocess(x, manifest.input)))
    out = []
    for path, p in zip(args.images, probs):
        k = int(p.argmax())
        out.append({"image": path, "class": manifest.classes[k], "index": k, "probability": float(p[k])})
        print(f"{path}\t{manifest.classes[k]}\t{p[k]:.4f}")
    _write(args, {"predictions": out})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeguard-runtime", description="Verify and measure edgeguard bundles on a "
                                "device (no PyTorch).")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("bundle", help="Bundle folder (manifest.json, model.onnx, ...).")
        sp.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
        sp.add_argument("--engine", default=None, help="TensorRT engine file built on this device.")
        sp.add_argument("--report", default=None, help="Write the JSON report here.")

    v = sub.add_parser("validate", help="Integrity checks, then accuracy against the manifest's bounds.")
    common(v)
    v.add_argument("--public-key", default=None, help="The vendor's Ed25519 public key (PEM).")
    v.add_argument("--allow-unsigned", action="store_true", help="Skip the signature check (bench tests only).")
    v.set_defaults(fn=cmd_validate)
    b = sub.add_parser("bench", help="Latency p50/p95/p99 and throughput at batch 1 and a larger batch.")
    common(b)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--iterations", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("predict", help="Class and probability for image files.")
    common(r)
    r.add_argument("images", nargs="+")
    r.set_defaults(fn=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except IntegrityError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
