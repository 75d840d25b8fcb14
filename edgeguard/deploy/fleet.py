"""The deploy steps for one device, the fleet around them, and the result table.

Per device: probe → (unchanged? stop) → upload into incoming/ → check every sha256 there → install the
runtime wheel if the device's differs → stage into bundles/<id> → build the engine where TensorRT is →
`edgeguard-runtime validate` (and `bench`) → fetch the reports → switch `current` (keep `previous`) or, on
failure, discard the new bundle so the device keeps what it had. Nothing the camera runs changes until the
last step, which is one atomic rename on the device (`runtime/device.py`).
"""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from runtime.device import bundle_digest
from runtime.fileio import atomic_write_text, sha256_file

from ..errors import CheckFailed, EdgeguardError
from . import ssh
from .ssh import Device, SshError

STEPS = ["connect", "upload", "verify", "runtime", "stage", "engine", "validate", "bench", "switch"]

#: Runs on the device with its own python before our runtime is there: checks every uploaded file.
HASHCHECK = r"""
import hashlib, os, sys
d = sys.argv[1]
bad = []
for line in open(os.path.join(d, "SHA256SUMS")):
    digest, name = line.rstrip("\n").split("  ", 1)
    h = hashlib.sha256()
    try:
        with open(os.path.join(d, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        bad.append(name + " (missing)")
        continue
    if h.hexdigest() != digest:
        bad.append(name)
if bad:
    sys.stderr.write("sha256 mismatch: " + ", ".join(bad[:5]) + "\n")
    sys.exit(1)
print("ok")
"""

PROBE = """set -e
R={root}
mkdir -p "$R/incoming" "$R/bundles" "$R/lib" "$R/reports"
cd "$R"
echo "root=$(pwd)"
if [ -L current ]; then echo "current=$(basename "$(readlink current)")"; else echo "current="; fi
if [ -f runtime.id ]; then echo "runtime=$(cat runtime.id)"; else echo "runtime="; fi
T=$(command -v trtexec || true)
if [ -z "$T" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then T=/usr/src/tensorrt/bin/trtexec; fi
echo "trtexec=$T"
echo "python=$({python} -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
find incoming -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {{}} + 2>/dev/null || true
"""

_SEP = "----edgeguard-report----"


@dataclass
class DeployOptions:
    force: bool = False
    public_key: str | None = None
    allow_unsigned: bool = False
    report_dir: Path | None = None
    bench_iterations: int = 50
    timeout: float = 900
    multiplex: bool = True  # one SSH connection per device for the whole deploy (ControlMaster)


@dataclass
class HostResult:
    device: str
    result: str  # deployed | unchanged | failed | refused | rolled-back
    bundle: str | None = None
    engine: str = "-"
    backend: str = "-"  # the backend validation actually ran on the device (from its report)
    authorised: float | None = None
    unauthorised: float | None = None
    latency_ms: float | None = None
    detail: str = ""
    current: str | None = None
    previous: str | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("deployed", "unchanged", "rolled-back")


@dataclass
class PreparedBundle:
    """A bundle checked on the host, with what travels to every device."""

    path: Path
    bundle_id: str
    backend: str
    files: list[tuple[str, Path]] = field(default_factory=list)
    wheel: Path | None = None
    wheel_id: str = ""


def prepare(bundle: str | Path, opts: DeployOptions, workdir: Path) -> PreparedBundle:
    """Verify the bundle here first (a broken bundle never reaches the fleet) and list what to upload."""
    from converters.runtime_dist import write_wheel
    from runtime.integrity import verify_bundle
    from runtime.manifest import BundleError

    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise EdgeguardError(f"{bundle}: not a bundle (no manifest.json); make one with `edgeguard build`")
    if opts.public_key is None and not opts.allow_unsigned:
        raise EdgeguardError("pass --public-key vendor.pub (the key devices trust), or --allow-unsigned for a "
                             "bench device")
    try:
        manifest, _ = verify_bundle(bundle, opts.public_key, require_signature=not opts.allow_unsigned)
    except BundleError as e:
        raise CheckFailed(f"{bundle} does not verify on this host, not deploying it: {e}") from None
    files, hashes = [], {}  # each file is read once: its hash serves SHA256SUMS and the bundle id
    for p in sorted(bundle.rglob("*")):
        if p.is_symlink():
            raise EdgeguardError(f"{p}: bundles may not contain symlinks")
        if p.is_file():
            rel = p.relative_to(bundle).as_posix()
            files.append((f"bundle/{rel}", p))
            hashes[rel] = sha256_file(p)
    carried = sorted(bundle.glob("runtime/edgeguard_runtime-*.whl"))
    wheel = carried[-1] if carried else write_wheel(workdir)
    extra = [(f"runtime/{wheel.name}", wheel)]
    if opts.public_key:
        extra.append(("trusted.pub", Path(opts.public_key)))
    sums = workdir / "SHA256SUMS"
    lines = [f"{hashes[a.removeprefix('bundle/')]}  {a}\n" for a, _ in files]
    atomic_write_text(sums, "".join(lines + [f"{sha256_file(p)}  {a}\n" for a, p in extra]))
    return PreparedBundle(path=bundle, bundle_id=bundle_digest(bundle, hashes),
                          backend=manifest.target.backend, files=files + extra + [("SHA256SUMS", sums)],
                          wheel=wheel, wheel_id=sha256_file(wheel)[:16])


def _kv(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _probe(dev: Device, timeout: float) -> dict[str, str]:
    out = ssh.run(dev, PROBE.format(root=ssh.root_expr(dev.root), python=shlex.quote(dev.python)), "connect",
                  timeout=timeout)
    info = _kv(out.stdout)
    if not info.get("python"):
        raise SshError(f"{dev.name}: `{dev.python}` does not run on the device: set python = \"...\" in the "
                       "inventory (or --python)")
    return info


def _json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SshError(f"unexpected answer from the device: {text.strip()[-200:]!r}")


def _fill_from_reports(res: HostResult, validate: dict | None, bench: dict | None) -> None:
    if validate:
        rows = validate.get("accuracy") or []
        auth = [r["accuracy"] for r in rows if r.get("role") == "authorised"]
        unauth = [r["accuracy"] for r in rows if r.get("role") == "unauthorised"]
        res.authorised = auth[0] if auth else None
        res.unauthorised = max(unauth) if unauth else None
        b = validate.get("backend") or {}
        if isinstance(b, dict) and b.get("backend"):
            res.backend = str(b["backend"]) + (f" ({', '.join(b['providers'][:1])})" if b.get("providers") else "")
        if not validate.get("ok"):
            res.detail = validate.get("error") or "; ".join(validate.get("failures") or []) or res.detail
    if bench and bench.get("results"):
        res.latency_ms = bench["results"][0].get("p50_ms")


def _fetch(dev: Device, root: str, bundle_id: str, opts: DeployOptions) -> tuple[dict | None, dict | None]:
    out = ssh.run(dev, f"cd {root} && cat reports/{bundle_id}.validate.json 2>/dev/null; echo; echo {_SEP}; "
                       f"cat reports/{bundle_id}.bench.json 2>/dev/null; true", "report fetch", timeout=opts.timeout)
    parts = out.stdout.split(_SEP)
    docs = []
    for part in parts[:2]:
        try:
            docs.append(json.loads(part) if part.strip() else None)
        except json.JSONDecodeError:
            docs.append(None)
    docs += [None] * (2 - len(docs))
    if opts.report_dir is not None:
        d = Path(opts.report_dir) / re.sub(r"[^A-Za-z0-9_.@-]+", "_", dev.name)
        for name, doc in zip(("validate.json", "bench.json"), docs):
            if doc is not None:
                atomic_write_text(d / name, json.dumps(doc, indent=2))
    return docs[0], docs[1]


def deploy_one(dev: Device, prep: PreparedBundle, opts: DeployOptions,
               step: Callable[[str], None] = lambda s: None) -> HostResult:
    """Deploy to one device; never raises for device-side trouble: the HostResult says what happened."""
    res = HostResult(device=dev.name, result="failed", bundle=prep.bundle_id)
    inc = None
    root = ""
    try:
        step("connect")
        info = _probe(dev, opts.timeout)
        root = shlex.quote(info["root"])
        if info.get("current") == prep.bundle_id and info.get("runtime") == prep.wheel_id and not opts.force:
            res.result, res.engine = "unchanged", "-"
            res.detail = "already current (--force redeploys)"
            _fill_from_reports(res, *_fetch(dev, root, prep.bundle_id, opts))
            res.current = prep.bundle_id
            return res
        inc = f"incoming/{prep.bundle_id}-{uuid.uuid4().hex[:8]}"
        step("upload")
        ssh.upload(dev, prep.files, f"{root}/{inc}", timeout=opts.timeout)
        step("verify")
        ssh.run(dev, f"cd {root} && {shlex.quote(dev.python)} - {inc}", "sha256 check", stdin=HASHCHECK,
                timeout=opts.timeout)
        lib = f"{root}/lib/{prep.wheel_id}"
        py = f"cd {root} && PYTHONPATH={lib} {shlex.quote(dev.python)}"
        step("runtime")
        if info.get("runtime") != prep.wheel_id or opts.force:
            _install_runtime(dev, root, inc, prep, opts)
        step("stage")
        key = f" --key {inc}/trusted.pub" if opts.public_key else ""
        staged = _json_line(ssh.run(dev, f"{py} -m runtime.device stage . {inc} {prep.bundle_id}{key}",
                                    "stage", timeout=opts.timeout).stdout)
        inc = None  # stage removed it
        if staged.get("trusted_key") == "differs":
            res.detail = "the device trusts another vendor key than --public-key; validating with the device's"
        bdir = f"bundles/{prep.bundle_id}"
        engine_arg = ""
        step("engine")
        if prep.backend == "tensorrt" and info.get("trtexec"):
            tdir = shlex.quote(str(Path(info["trtexec"]).parent))
            r = ssh.run(dev, f"cd {root}/{bdir} && PATH={tdir}:$PATH PYTHONPATH={lib} "
                             f"EDGEGUARD_PYTHON={shlex.quote(dev.python)} sh build_engine.sh", "engine build",
                        timeout=opts.timeout, check=False)
            if r.returncode != 0:
                res.engine = "failed"
                raise SshError(f"{dev.name}: build_engine.sh failed: "
                               f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}")
            res.engine, engine_arg = "built", f" --engine {bdir}/model.engine"
        else:
            res.engine = "no TensorRT" if prep.backend == "tensorrt" else "n/a (onnx)"
        step("validate")
        trust = " --allow-unsigned" if opts.allow_unsigned else " --public-key trusted.pub"
        v = ssh.run(dev, f"{py} -m runtime.cli validate {bdir}{trust}{engine_arg} "
                         f"--report reports/{prep.bundle_id}.validate.json", "validate", timeout=opts.timeout,
                    check=False)
        if v.returncode == 255:
            ssh.raise_for(dev, 255, v.stderr, "validate")
        passed = v.returncode == 0
        if passed:
            step("bench")
            ssh.run(dev, f"{py} -m runtime.cli bench {bdir}{trust}{engine_arg} --iterations {opts.bench_iterations} "
                         f"--report reports/{prep.bundle_id}.bench.json", "bench", timeout=opts.timeout)
        validate, bench = _fetch(dev, root, prep.bundle_id, opts)
        _fill_from_reports(res, validate, bench)
        step("switch")
        if passed:
            st = _json_line(ssh.run(dev, f"{py} -m runtime.device activate . {prep.bundle_id}", "switch",
                                    timeout=opts.timeout).stdout)
            res.result = "deployed"
        else:
            st = _json_line(ssh.run(dev, f"{py} -m runtime.device discard . {prep.bundle_id}", "discard",
                                    timeout=opts.timeout).stdout)
            last = (v.stdout + v.stderr).strip().splitlines()
            res.detail = res.detail or (last[-1] if last else f"validate exited {v.returncode}")
            res.detail = "validation failed, previous bundle kept: " + res.detail
        res.current, res.previous = st.get("current"), st.get("previous")
    except SshError as e:
        res.result = "refused" if e.kind == "host-key" else "failed"
        res.detail = str(e)
        if inc is not None and e.kind == "remote":  # the link is up: tidy the upload (a cut link leaves it to age out)
            ssh.run(dev, f"rm -rf {root}/{inc}", "cleanup", check=False, timeout=60)
    return res


def _install_runtime(dev: Device, root: str, inc: str, prep: PreparedBundle, opts: DeployOptions) -> None:
    wid, py = prep.wheel_id, shlex.quote(dev.python)
    cmd = (f"cd {root} && rm -rf lib/.tmp-{wid} && {py} -m pip install --quiet --disable-pip-version-check --no-deps "
           f"--no-index --target lib/.tmp-{wid} {inc}/runtime/{prep.wheel.name} && rm -rf lib/{wid} && "
           f"mv lib/.tmp-{wid} lib/{wid} && PYTHONPATH={root}/lib/{wid} {py} -c "
           f"'import runtime.cli, runtime.device, numpy, onnx, onnxruntime, cryptography' && "
           f"echo {wid} > runtime.id.tmp && mv -f runtime.id.tmp runtime.id")
    try:
        ssh.run(dev, cmd, "runtime install", timeout=opts.timeout)
    except SshError as e:
        if e.kind != "remote":
            raise
        raise SshError(f"{e} — the device's {dev.python} needs pip and the runtime's dependencies (pip install "
                       "numpy onnx onnxruntime cryptography pillow, or the wheel with its dependencies)") from None


def rollback_one(dev: Device, opts: DeployOptions, step: Callable[[str], None] = lambda s: None) -> HostResult:
    """Swap the device's current and previous bundles."""
    res = HostResult(device=dev.name, result="failed")
    try:
        step("connect")
        info = _probe(dev, opts.timeout)
        if not info.get("runtime"):
            raise SshError(f"{dev.name}: nothing was deployed here (no runtime installed)")
        root = shlex.quote(info["root"])
        step("switch")
        r = ssh.run(dev, f"cd {root} && PYTHONPATH={root}/lib/{info['runtime']} {shlex.quote(dev.python)} -m "
                         "runtime.device rollback .", "rollback", timeout=opts.timeout, check=False)
        st = _json_line(r.stdout) if r.stdout.strip() else {}
        if r.returncode != 0:
            raise SshError(f"{dev.name}: rollback: {st.get('error') or r.stderr.strip()}")
        res.result, res.current, res.previous, res.bundle = "rolled-back", st["current"], st["previous"], st["current"]
        validate, bench = _fetch(dev, root, st["current"], opts)
        _fill_from_reports(res, validate, bench)
    except SshError as e:
        res.result = "refused" if e.kind == "host-key" else "failed"
        res.detail = str(e)
    return res


class FleetProgress:
    """One line per device: tqdm bars on a terminal, plain `device: step` lines otherwise."""

    def __init__(self, names: list[str], steps: list[str]):
        from ..progress import enabled

        self.lock = threading.Lock()
        self.steps = steps
        self.bars = {}
        if enabled():
            from tqdm.auto import tqdm

            width = max(len(n) for n in names)
            self.bars = {n: tqdm(total=len(steps), position=i, desc=n.ljust(width), leave=True,
                                 bar_format="{desc} {bar:20} {postfix}") for i, n in enumerate(names)}

    def callback(self, name: str) -> Callable[[str], None]:
        def step(s: str) -> None:
            with self.lock:
                bar = self.bars.get(name)
                if bar is not None:
                    bar.n = self.steps.index(s) + 1 if s in self.steps else bar.n
                    bar.set_postfix_str(s)
                else:
                    print(f"{name}: {s}", file=sys.stderr, flush=True)
        return step

    def done(self, name: str, res: HostResult) -> None:
        with self.lock:
            bar = self.bars.get(name)
            if bar is not None:
                bar.n = bar.total
                bar.set_postfix_str(res.result)
            else:
                print(f"{name}: {res.result}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_fleet(devices: list[Device], action: Callable[[Device, Callable[[str], None]], HostResult], jobs: int,
              steps: list[str]) -> list[HostResult]:
    """Run `action` on every device with at most `jobs` at once; results in the devices' order."""
    if jobs < 1:
        raise EdgeguardError("--jobs must be at least 1")
    prog = FleetProgress([d.name for d in devices], steps)

    def one(dev: Device) -> HostResult:
        res = action(dev, prog.callback(dev.name))
        prog.done(dev.name, res)
        return res

    try:
        with ThreadPoolExecutor(max_workers=min(jobs, len(devices))) as pool:
            return list(pool.map(one, devices))
    finally:
        prog.close()


def deploy(bundle: str | Path, devices: list[Device], opts: DeployOptions | None = None, jobs: int = 4
           ) -> list[HostResult]:
    """Deploy `bundle` to every device (concurrently, at most `jobs` at once) and return one result each."""
    opts = opts or DeployOptions()
    if not devices:
        raise EdgeguardError("no devices: give --host user@device[:port] or --inventory fleet.toml")
    with tempfile.TemporaryDirectory(prefix="edgeguard-deploy-") as tmp, _multiplexed(devices, opts) as devs:
        prep = prepare(bundle, opts, Path(tmp))
        results = run_fleet(devs, lambda d, s: deploy_one(d, prep, opts, s), jobs, STEPS)
    _write_summary(opts, results)
    return results


@contextlib.contextmanager
def _multiplexed(devices: list[Device], opts: DeployOptions):
    """The devices with a private control folder for shared connections (closed and removed at the end)."""
    if not opts.multiplex:
        yield devices
        return
    cdir = tempfile.mkdtemp(prefix="egssh-")  # short: a unix socket path has ~100 characters; 0700
    devs = [replace(d, control_dir=cdir) if d.control_dir is None else d for d in devices]
    try:
        yield devs
    finally:
        for d in devs:
            ssh.close_master(d)
        shutil.rmtree(cdir, ignore_errors=True)


def rollback(devices: list[Device], opts: DeployOptions | None = None, jobs: int = 4) -> list[HostResult]:
    opts = opts or DeployOptions()
    if not devices:
        raise EdgeguardError("no devices: give --host user@device[:port] or --inventory fleet.toml")
    with _multiplexed(devices, opts) as devs:
        results = run_fleet(devs, lambda d, s: rollback_one(d, opts, s), jobs, ["connect", "switch"])
    _write_summary(opts, results)
    return results


def _write_summary(opts: DeployOptions, results: list[HostResult]) -> None:
    if opts.report_dir is not None:
        atomic_write_text(Path(opts.report_dir) / "summary.json", json.dumps([asdict(r) for r in results], indent=2))


def format_table(results: list[HostResult]) -> str:
    def pct(v):
        return "-" if v is None else f"{v * 100:.1f}%"

    head = ["host", "bundle", "engine", "backend used", "authorised", "unauthorised", "latency", "result"]
    rows = [[r.device, (r.bundle or "-")[:12], r.engine, r.backend, pct(r.authorised), pct(r.unauthorised),
             "-" if r.latency_ms is None else f"{r.latency_ms:.2f} ms", r.result] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.device}: {r.detail.removeprefix(r.device + ': ')}" for r in results if r.detail]
    return "\n".join(lines + notes)
