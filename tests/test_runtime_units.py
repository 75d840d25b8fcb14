"""Runtime units: the manifest loader (fuzzed), its JSON Schema, the TensorRT build settings."""
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.manifest import BundleError, json_schema, parse_manifest

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["schema_version", "model", "mask", "input", "classes", "target",
                                                  "authorised", "created", "producer", "method"]),
                                 json_values).map(lambda d: json.dumps({**d, "schema_version": 1}).encode())))
def test_manifest_loader_never_crashes(data):
    try:
        parse_manifest(data)
    except BundleError:
        pass


def test_schema_file_is_generated_from_the_dataclasses():
    committed = json.loads((Path(__file__).resolve().parents[1] / "runtime" / "manifest.schema.json").read_text())
    assert committed == json_schema()


def test_missing_field_is_named():
    with pytest.raises(BundleError, match="manifest field model: missing"):
        parse_manifest(json.dumps({"schema_version": 1, "created": "", "producer": "", "method": "", "classes": [],
                                   "input": {"shape": [3, 32, 32]}}))
    with pytest.raises(BundleError, match="input.shape\\[0\\]: expected an integer"):
        parse_manifest(json.dumps({"schema_version": 1, "input": {"shape": ["a"]}, "created": "", "producer": "",
                                   "method": "", "classes": []}))


def test_tensorrt_settings_by_generation():
    from converters.tensorrt_build import builder_settings, trtexec_command

    s10 = builder_settings("10.3.0", "fp16", sparse_24=False, workspace_mb=512)
    assert s10["flags"] == ["FP16"] and not s10["strongly_typed"] and s10["workspace_bytes"] == 512 << 20
    s11 = builder_settings("11.0.1", "int8", sparse_24=True, workspace_mb=512)
    assert s11["strongly_typed"] and s11["flags"] == ["SPARSE_WEIGHTS"]
    assert "--sparsity=enable" in trtexec_command("m.onnx", "m.engine", "fp16", True, 256)
    assert "force" not in trtexec_command("m.onnx", "m.engine", "fp16", True, 256)
    assert "--stronglyTyped" in trtexec_command("m.onnx", "m.engine", "int8", False, 256, strongly_typed=True)
    at224 = trtexec_command("m.onnx", "m.engine", "fp16", False, 256, input_shape=(3, 224, 224))
    assert "--minShapes=input:1x3x224x224" in at224 and "--maxShapes=input:256x3x224x224" in at224  # the card's size


def test_tensorrt_build_says_unavailable(tmp_path):
    from converters.tensorrt_build import TensorRTUnavailable, build_engine, is_available

    if is_available():
        pytest.skip("TensorRT present")
    with pytest.raises(TensorRTUnavailable, match="not available"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


def test_trtexec_bench_runs_load_engine_and_reads_its_times(tmp_path, monkeypatch):
    """With a stand-in `trtexec` on PATH that writes an --exportTimes file as trtexec does, the bench reports
    the H2D / compute / D2H split; without one, it says so."""
    import os
    import stat
    import sys

    from runtime import trtexec

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(trtexec, "JETSON_TRTEXEC", str(tmp_path / "nowhere"))
    got = trtexec.trtexec_bench(tmp_path / "m.engine", "input", (1, 3, 32, 32), 10)
    assert not got["available"] and "trtexec not found" in got["reason"]
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
                    "assert args['--loadEngine'].endswith('m.engine') and args['--shapes'] == 'input:1x3x32x32'\n"
                    "assert '--useCudaGraph' in sys.argv\n"
                    "recs = [{'h2dMs': 0.01 * i, 'computeMs': 0.2, 'd2hMs': 0.005, 'latencyMs': 0.2 + 0.015 * i}"
                    " for i in range(int(args['--iterations']))]\n"
                    "json.dump(recs, open(args['--exportTimes'], 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent) + os.pathsep + os.environ["PATH"])
    got = trtexec.trtexec_bench(tmp_path / "m.engine", "input", (1, 3, 32, 32), 10)
    assert got["available"] and got["inferences"] == 10
    assert got["compute"]["mean_ms"] == pytest.approx(0.2) and got["h2d"]["mean_ms"] == pytest.approx(0.045)
    assert got["d2h"]["p50_ms"] == pytest.approx(0.005) and "--loadEngine" in got["command"]


def test_engine_cache_key_and_ort_tensorrt_options(tmp_path, monkeypatch):
    from runtime.backends.onnxruntime_backend import provider_options
    from runtime.engine_cache import cache_key

    base = cache_key("a" * 64, "10.3.0", "8.7", "fp16")
    assert base == cache_key("a" * 64, "10.3.0", "8.7", "fp16")
    for other in (cache_key("b" * 64, "10.3.0", "8.7", "fp16"), cache_key("a" * 64, "10.4.0", "8.7", "fp16"),
                  cache_key("a" * 64, "10.3.0", "8.6", "fp16"), cache_key("a" * 64, "10.3.0", "8.7", "int8")):
        assert other != base  # each part of the key separates engines
    monkeypatch.setenv("EDGEGUARD_ENGINE_CACHE", str(tmp_path))
    trt, cpu = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], "fp16")
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"].startswith(str(tmp_path))
    assert trt["trt_fp16_enable"] == "True" and cpu == {}
    assert provider_options(["TensorrtExecutionProvider"], "fp32")[0]["trt_fp16_enable"] == "False"
