"""`edgeguard deploy` against a real OpenSSH server on 127.0.0.1 (a throwaway "device" per test root).

The server is Debian's openssh-server; `.ci/run` installs it and sets EDGEGUARD_REQUIRE_SSHD=1 so that a
missing sshd fails there instead of skipping.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from edgeguard.deploy import fleet
from edgeguard.deploy.inventory import load_inventory, parse_host
from edgeguard.deploy.ssh import Device
from edgeguard.errors import EdgeguardError


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    from edgeguard.deploy import loopback

    if loopback.find_sshd() is None:
        if os.environ.get("EDGEGUARD_REQUIRE_SSHD") == "1":
            pytest.fail("sshd is required here (EDGEGUARD_REQUIRE_SSHD=1): apt install openssh-server")
        pytest.skip("no sshd: apt install openssh-server to run the deploy tests")
    dev = loopback.start(tmp_path_factory.mktemp("loopback"))
    yield dev
    dev.stop()


def _device(lb, name: str, **kw) -> Device:
    base = Device(host="127.0.0.1", user=lb.user, port=lb.port, identity=str(lb.identity),
                  known_hosts=str(lb.known_hosts), root=str(lb.dir / "home" / name), python=sys.executable)
    return replace(base, name=name, **kw)


@pytest.fixture(scope="module")
def bundles(protected, keys, tmp_path_factory):
    """A: jetson bundle, B: a second (cpu) bundle, X: signed with a key the devices do not trust."""
    from edgeguard.build import build

    d = tmp_path_factory.mktemp("bundles")
    build(protected, d / "A", target="jetson", sign_key=keys[0][0], samples=200, allow_weak=True)
    build(protected, d / "B", target="cpu", sign_key=keys[0][0], samples=120, allow_weak=True)
    build(protected, d / "X", target="cpu", sign_key=keys[1][0], samples=120, allow_weak=True)
    return {k: d / k for k in "ABX"}


def _bid(bundle: Path) -> str:
    from runtime.device import bundle_digest

    return bundle_digest(bundle)


def _current(dev: Device) -> str | None:
    link = Path(dev.root) / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


def _opts(keys, tmp_path, **kw):
    return fleet.DeployOptions(public_key=str(keys[0][1]), report_dir=tmp_path / "reports", bench_iterations=5, **kw)


# ---- no server needed -------------------------------------------------------------------------------------

def test_runtime_wheel_installs_without_torch(tmp_path):
    from converters.runtime_dist import wheel_bytes, write_wheel

    assert wheel_bytes() == wheel_bytes()  # reproducible: bundles carrying it stay byte-stable
    whl = write_wheel(tmp_path)
    meta = zipfile.ZipFile(whl).read("edgeguard_runtime-0.1.0.dist-info/METADATA").decode()
    requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist")]
    plain = [r for r in requires if "extra ==" not in r]
    assert not any("onnxruntime" in r or "torch" in r for r in plain), plain  # never replaces a Jetson's ORT
    assert any("onnxruntime>=" in r and "'cpu'" in r for r in requires)
    assert any("onnxruntime-gpu" in r and "'gpu'" in r for r in requires)
    assert any("cuda-python" in r and "'tensorrt'" in r for r in requires)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(whl)], check=True)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['edgeguard'] = None\n"
            "import runtime, runtime.cli, runtime.device, runtime.integrity; print(runtime.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    assert (target / "bin" / "edgeguard-runtime").exists()


def _stand_in_wheel(folder: Path, dist: str, version: str, module: str, body: str) -> Path:
    """A minimal real wheel named `dist` that provides `module` (a stand-in for a package we cannot fetch)."""
    import base64
    import hashlib

    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    files = {f"{module}/__init__.py": body.encode(),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    rec = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b'=').decode()},{len(v)}\n"
                  for k, v in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = rec.encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_runtime_install_keeps_a_jetsons_onnxruntime_gpu(tmp_path):
    """A Jetson-like environment: a venv holding `onnxruntime-gpu` (a stand-in: NVIDIA's wheel is not
    reachable here). `pip install edgeguard-runtime` (plain) leaves it untouched and the runtime uses it; the
    [cpu] extra would pull `onnxruntime` (refused here, offline, which is how the test sees it try)."""
    from converters.runtime_dist import write_wheel

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = write_wheel(wheels)
    for dist, mod in (("numpy", "numpy"), ("onnx", "onnx"), ("cryptography", "cryptography"), ("pillow", "PIL")):
        _stand_in_wheel(wheels, dist, "99.0", mod, "")
    gpu = _stand_in_wheel(tmp_path, "onnxruntime-gpu", "1.99.0", "onnxruntime",
                          "__version__ = 'stand-in onnxruntime-gpu'\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    subprocess.run(pip + [str(gpu)], check=True)
    r = subprocess.run(pip + [str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = {d["name"].lower(): d["version"] for d in json.loads(subprocess.run(
        [py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout)}
    assert listed.get("onnxruntime-gpu") == "1.99.0" and "onnxruntime" not in listed, listed
    out = subprocess.run([py, "-c", "import onnxruntime; print(onnxruntime.__version__)"], capture_output=True,
                         text=True)
    assert out.stdout.strip() == "stand-in onnxruntime-gpu"
    r = subprocess.run(pip + [f"{whl}[cpu]"], capture_output=True, text=True)
    assert r.returncode != 0 and "onnxruntime" in (r.stderr + r.stdout)  # the extra would have fetched it


def test_host_strings_and_inventory(tmp_path):
    d = parse_host("edge@[::1]:2222")
    assert (d.user, d.host, d.port) == ("edge", "::1", 2222)
    d = parse_host("cam.local", Device(host="", user="ops", port=2200))
    assert (d.user, d.host, d.port, d.name) == ("ops", "cam.local", 2200, "ops@cam.local:2200")
    for bad in ("a@b@c", "host:99999", ""):
        with pytest.raises(EdgeguardError):
            parse_host(bad)
    inv = tmp_path / "fleet.toml"
    inv.write_text('[defaults]\nuser = "edge"\nidentity = "keys/fleet"\n\n[[device]]\nname = "gate"\n'
                   'host = "10.0.0.5:2222"\npython = "/opt/py/bin/python3"\n\n[[device]]\nhost = "10.0.0.6"\n')
    a, b = load_inventory(inv)
    assert (a.name, a.port, a.python, a.identity) == ("gate", 2222, "/opt/py/bin/python3", str(tmp_path / "keys/fleet"))
    assert (b.user, b.port, b.python) == ("edge", 22, "python3")
    inv.write_text('[[device]]\nhost = "h"\nprot = 2\n')
    with pytest.raises(EdgeguardError, match="unknown key"):
        load_inventory(inv)


# ---- against the loopback sshd ----------------------------------------------------------------------------

def test_deploy_validates_switches_and_is_idempotent(lb, bundles, keys, tmp_path):
    from click.testing import CliRunner

    from edgeguard.cli import main

    inv = tmp_path / "fleet.toml"
    inv.write_text(lb.inventory(python=sys.executable, names=("cam-a", "cam-b")))
    args = ["deploy", str(bundles["A"]), "--inventory", str(inv), "--public-key", str(keys[0][1]), "--jobs", "2",
            "--report-dir", str(tmp_path / "rep")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("deployed") == 2 and "authorised" in r.stdout
    assert "backend used" in r.stdout and r.stdout.count("onnxruntime") >= 2  # the backend that really ran
    bid = _bid(bundles["A"])
    manifest = json.loads((bundles["A"] / "manifest.json").read_text())
    for name in ("cam-a", "cam-b"):
        root = lb.dir / "home" / name
        assert Path(os.readlink(root / "current")).name == bid
        assert (root / "trusted.pub").read_bytes() == Path(keys[0][1]).read_bytes()
        rep = json.loads((tmp_path / "rep" / name / "validate.json").read_text())
        assert rep["ok"] and rep["accuracy"][0]["accuracy"] == pytest.approx(manifest["authorised"]["accuracy"])
        assert json.loads((tmp_path / "rep" / name / "bench.json").read_text())["results"][0]["p50_ms"] > 0
        # the runtime that validated is the wheel installed on the device, not the host's package
        assert (root / "lib" / (root / "runtime.id").read_text().strip() / "runtime" / "cli.py").exists()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.stdout.count("unchanged") >= 2, again.output
    forced = CliRunner().invoke(main, args + ["--force"])
    assert forced.exit_code == 0 and forced.stdout.count("deployed") == 2, forced.output


def test_failed_validation_keeps_previous_and_rollback(lb, bundles, keys, tmp_path):
    dev = _device(lb, "cam-roll")
    opts = _opts(keys, tmp_path)
    [a] = fleet.deploy(bundles["A"], [dev], opts)
    [b] = fleet.deploy(bundles["B"], [dev], opts)
    assert a.result == b.result == "deployed" and b.authorised > 0.6 and b.latency_ms > 0
    assert (_current(dev), b.previous) == (_bid(bundles["B"]), _bid(bundles["A"]))
    # X verifies with its own key on the host, but the device trusts the vendor key it was given first
    [x] = fleet.deploy(bundles["X"], [dev], replace(opts, public_key=str(keys[1][1])))
    assert x.result == "failed" and "signature" in x.detail and "previous bundle kept" in x.detail
    assert _current(dev) == _bid(bundles["B"])
    assert not (Path(dev.root) / "bundles" / _bid(bundles["X"])).exists()
    [r] = fleet.rollback([dev], opts)
    assert r.result == "rolled-back" and _current(dev) == _bid(bundles["A"]) and r.previous == _bid(bundles["B"])


class _CuttingProxy:
    """TCP forwarder to sshd that drops a connection once the client has sent `limit` bytes (a cable pulled)."""

    def __init__(self, port: int, limit: int):
        self.target, self.limit = port, limit
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream):
        sent = 0
        try:
            while data := src.recv(16384):
                sent += len(data)
                if upstream and sent > self.limit:
                    self.cuts += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_connection_cut_during_upload_leaves_device_unchanged(lb, bundles, keys, tmp_path):
    dev = _device(lb, "cam-cut")
    opts = _opts(keys, tmp_path)
    [first] = fleet.deploy(bundles["A"], [dev], opts)
    assert first.result == "deployed"
    proxy = _CuttingProxy(lb.port, limit=100_000)  # the probe sends a few kB; the bundle upload ~300 kB
    kh = tmp_path / "proxy_known_hosts"
    kh.write_text(lb.known_hosts.read_text().replace(f":{lb.port} ", f":{proxy.port} "))
    [cut] = fleet.deploy(bundles["B"], [replace(dev, port=proxy.port, known_hosts=str(kh))], opts)
    assert proxy.cuts >= 1
    assert cut.result == "failed" and "upload" in cut.detail, cut.detail
    assert _current(dev) == _bid(bundles["A"])
    assert not (Path(dev.root) / "bundles" / _bid(bundles["B"])).exists()
    assert not (Path(dev.root) / "previous").exists()


def test_unknown_or_wrong_host_key_is_refused(lb, bundles, keys, tmp_path):
    wrong = tmp_path / "wrong_known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    kt, kb = (tmp_path / "k.pub").read_text().split()[:2]
    wrong.write_text(f"[127.0.0.1]:{lb.port} {kt} {kb}\n")
    opts = _opts(keys, tmp_path)
    dev = _device(lb, "cam-keys", known_hosts=str(wrong))
    [r] = fleet.deploy(bundles["A"], [dev], opts)
    assert r.result == "refused" and "host key" in r.detail and not Path(dev.root).exists()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    [r] = fleet.deploy(bundles["A"], [replace(dev, known_hosts=str(empty))], opts)
    assert r.result == "refused" and "--accept-new-host-key" in r.detail
    [r] = fleet.deploy(bundles["A"], [replace(dev, known_hosts=str(empty), accept_new_host_key=True)], opts)
    assert r.result == "deployed" and lb.host_key_pub.read_text().split()[1] in empty.read_text()
    # a changed key is refused even with accept-new
    [r] = fleet.deploy(bundles["A"], [replace(dev, known_hosts=str(wrong), accept_new_host_key=True)], opts)
    assert r.result == "refused"


def test_deploy_shares_one_ssh_connection_per_device(lb, bundles, keys, tmp_path):
    """ControlMaster: the whole deploy (probe, upload, verify, stage, validate, bench, reports, switch) is one
    authenticated connection per device; without sharing it is one per step. Counted in sshd's log."""
    log = lb.dir / "sshd.log"

    def accepted() -> int:
        return log.read_text(errors="replace").count("Accepted publickey")

    counts = {}
    for multiplex in (False, True):
        dev = _device(lb, f"cam-mux-{multiplex}")
        before = accepted()
        [res] = fleet.deploy(bundles["A"], [dev], _opts(keys, tmp_path, multiplex=multiplex, force=True))
        assert res.result == "deployed", res.detail
        time.sleep(0.3)
        counts[multiplex] = accepted() - before
    assert counts[True] == 1 and counts[False] >= 6, counts
