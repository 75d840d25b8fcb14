"""`edgeguard-runtime validate | bench | predict`: the device side (argparse: no host dependencies).

Every command verifies the bundle first (signature with --public-key, or --allow-unsigned for a bench test;
hashes; no unlisted files; mask), so nothing runs a tampered bundle. Exit codes: 0 every check passed,
1 a check failed ("FAILED: …": a signature that does not verify, a modified file, an accuracy bound, an
engine TensorRT cannot load), 2 bad input ("error: …": a missing file, malformed JSON, a file that is not a
key, a bad option).
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
                       input_name=manifest.input.input_name, output_name=manifest.input.output_name,
                       precision=manifest.target.precision)


def _verified(args):
    """The bundle's manifest after every integrity check (the same for validate, bench and predict)."""
    from .integrity import verify_bundle

    if args.report:
        rp = Path(args.report)
        if rp.is_dir():
            raise BundleError(f"--report {rp}: is a folder; give a file name for the JSON report")
    return verify_bundle(Path(args.bundle), args.public_key, args.engine, require_signature=not args.allow_unsigned,
                         oms_public_key=args.oms_public_key)


def _fail_line(e: BundleError) -> str:
    return f"{'FAILED' if isinstance(e, IntegrityError) else 'error'}: {e}"


def cmd_validate(args) -> int:
    from .measure import accuracy, load_validation

    bundle = Path(args.bundle)
    report: dict = {"bundle": str(bundle), "checks": [], "ok": False}
    try:
        from .integrity import protection_status

        manifest, checks = _verified(args)
        protected, word, line = protection_status(manifest)
        print(f"  {word:<5} {'protection':<12} {line}")
        report["protection"] = line
        report["protected"] = protected
        report["protection_strength"] = manifest.protection.strength if manifest.protection else ""
        report["checks"] = [c.__dict__ for c in checks]
        backend = _backend(args, manifest, bundle)
        report["backend"] = backend.describe()
        failures = []
        results = []
        for dc, role in [(manifest.authorised, "authorised")] + [(u, "unauthorised") for u in manifest.unauthorised]:
            x, y = load_validation(bundle / dc.file, manifest.input)
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
        print(_fail_line(e), file=sys.stderr)
        return e.exit_code
    _write(args, report)
    for c in report["checks"]:
        print(f"  ok    {c['name']:<12} {c['detail']}")
    for r in report["accuracy"]:
        bound = (f"≥ {r['min_accuracy'] * 100:.1f}%" if r["min_accuracy"] is not None else
                 f"≤ {r['max_accuracy'] * 100:.1f}%" if r["max_accuracy"] is not None else "")
        print(f"  {'ok' if not any(r['domain'] in f for f in failures) else 'FAIL':<5} {r['role']:<12} "
              f"{r['domain']}: {r['accuracy'] * 100:.2f}% on {r['samples']} samples {bound}")
    if code == 0:
        print(f"PASSED  ({report['backend']['backend']})")
    else:  # the verdict of a failed check goes to stderr, one line, like every other failure
        print(f"FAILED: {'; '.join(failures)}  ({report['backend']['backend']})", file=sys.stderr)
    return code


def _write(args, report: dict) -> None:
    if getattr(args, "report", None):
        try:
            atomic_write_text(args.report, json.dumps(report, indent=2))
        except OSError as e:
            raise BundleError(f"--report {args.report}: cannot write ({e.strerror})") from None


def cmd_bench(args) -> int:
    from .measure import latency

    bundle = Path(args.bundle)
    manifest, _ = _verified(args)
    backend = _backend(args, manifest, bundle)
    rows = [latency(backend, manifest.input, b, args.iterations, args.warmup) for b in (1, args.batch)]
    result = {"backend": backend.describe(), "results": rows}
    if args.engine:  # NVIDIA's own split of the host latency, where trtexec is installed
        from .trtexec import trtexec_bench

        result["trtexec"] = trtexec_bench(Path(args.engine), manifest.input.input_name, (1, *manifest.input.shape),
                                          args.iterations)
    _write(args, result)
    print(f"{'batch':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'images/s':>10}   ({result['backend']['backend']}, "
          "Python-side perf_counter around run())")
    for r in rows:
        print(f"{r['batch']:>6} {r['p50_ms']:>9.3f} {r['p95_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['throughput_ips']:>10.0f}")
    t = result.get("trtexec")
    if t is not None and t.get("available"):
        parts = ", ".join(f"{k} {t[k]['mean_ms']:.3f}" for k in ("h2d", "compute", "d2h", "latency") if k in t)
        print(f"trtexec (batch 1, CUDA graph), mean ms: {parts}")
    elif t is not None:
        print(f"trtexec: {t['reason']}")
    return 0


def cmd_predict(args) -> int:
    from .measure import load_images, preprocess, softmax

    bundle = Path(args.bundle)
    manifest, _ = _verified(args)
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


class _Parser(argparse.ArgumentParser):
    """Bad options are one line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _count(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= v <= 1_000_000:
            raise argparse.ArgumentTypeError(f"{v} is out of range ({low}…1000000)")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeguard-runtime", description="Verify and measure edgeguard bundles on a device (no "
                "PyTorch).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("bundle", help="Bundle folder (manifest.json, model.onnx, ...).")
        sp.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
        sp.add_argument("--engine", default=None, help="TensorRT engine file built on this device.")
        sp.add_argument("--report", default=None, help="Write the JSON report here.")
        sp.add_argument("--public-key", default=None, help="The vendor's Ed25519 public key (PEM).")
        sp.add_argument("--allow-unsigned", action="store_true", help="Skip the signature check (bench tests only).")
        sp.add_argument("--oms-public-key", default=None,
                        help="Also verify oms.sig (OpenSSF model signing) with this ECDSA P-256 public key; needs "
                             "the [oms] extra.")

    v = sub.add_parser("validate", help="Integrity checks, then accuracy against the manifest's bounds.")
    common(v)
    v.set_defaults(fn=cmd_validate)
    b = sub.add_parser("bench", help="Latency p50/p95/p99 and throughput at batch 1 and a larger batch.")
    common(b)
    b.add_argument("--batch", type=_count(1), default=32)
    b.add_argument("--iterations", type=_count(1), default=100)
    b.add_argument("--warmup", type=_count(0), default=10)
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
    except BundleError as e:  # IntegrityError included: "FAILED", exit 1
        print(_fail_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
