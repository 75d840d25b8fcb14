"""Property-based fuzzing: a mutated bundle manifest or model card is always a one-line error, never a crash.

Mutations (benchmarks/fuzz_mutations.py): deleted fields, changed types, numbers up to 10^5000 digits,
NaN/Infinity, lone surrogates, over-long names, deep nesting, byte damage, paths out of the bundle. The
manifest is checked both unsigned (to reach the parser) and re-signed with the vendor key (the signature
passes, so the strict parser and the file checks are what must hold). benchmarks/bench_fuzz.py runs 10,000.
"""
import contextlib
import io
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_mutations import KINDS, mutate  # noqa: E402

values = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | \
    st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


@pytest.fixture(scope="module")
def fuzz_bundle(protected, keys, tmp_path_factory):
    from edgeguard.build import build

    out = tmp_path_factory.mktemp("fuzz") / "bundle"
    build(protected, out, target="cpu", sign_key=keys[0][0], samples=20, allow_weak=True)
    return out


def run_runtime(argv: list[str]) -> tuple[int, str]:
    """The device CLI in-process: (exit code, stderr). Anything but a clean exit propagates as a crash."""
    from runtime.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), pick=st.integers(0, 10**6), value=values, resign=st.booleans())
def test_mutated_manifest_never_crashes(fuzz_bundle, keys, tmp_path, kind, pick, value, resign):
    from converters.signing import sign

    work = tmp_path / "b"
    if not work.exists():
        shutil.copytree(fuzz_bundle, work)
    original = (fuzz_bundle / "manifest.json").read_bytes()
    raw = mutate(original, kind, pick, value)
    (work / "manifest.json").write_bytes(raw)
    if resign:
        (work / "manifest.sig").write_bytes(sign(raw, keys[0][0]))
        argv = ["validate", str(work), "--public-key", str(keys[0][1])]
    else:
        argv = ["validate", str(work), "--allow-unsigned"]
    try:
        code, err = run_runtime(argv)
    finally:
        (work / "manifest.json").write_bytes(original)
        shutil.copy(fuzz_bundle / "manifest.sig", work / "manifest.sig")
    assert code in (0, 1, 2)
    if code:
        assert len(err.strip().splitlines()) == 1, err


def test_signed_manifest_with_a_5000_digit_number_fails_on_the_signature(fuzz_bundle, keys, tmp_path):
    """Untrusted bytes are authenticated before they are parsed: the huge number never reaches the parser."""
    work = tmp_path / "b"
    shutil.copytree(fuzz_bundle, work)
    raw = mutate((work / "manifest.json").read_bytes(), "huge_number", 4990)
    (work / "manifest.json").write_bytes(raw)
    code, err = run_runtime(["validate", str(work), "--public-key", str(keys[0][1])])
    assert code == 1 and err.startswith("FAILED: signature")
    code, err = run_runtime(["validate", str(work), "--allow-unsigned"])
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([k for k in KINDS if k not in ("bytes", "truncate")]), pick=st.integers(0, 10**6),
       value=values)
def test_mutated_model_card_is_an_edgeguard_error(protected, tmp_path, kind, pick, value):
    """Model files with edited metadata: load_artifact either loads or raises EdgeguardError (one line)."""
    from safetensors.torch import load, save

    from edgeguard.artifact import load_artifact
    from edgeguard.errors import EdgeguardError

    data = Path(protected).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    md = json.loads(data[8 : 8 + n])["__metadata__"]
    state = load(data)
    md["edgeguard"] = mutate(md["edgeguard"].encode(), kind, pick, value).decode("utf-8", "surrogatepass")
    path = tmp_path / "m.safetensors"
    try:
        path.write_bytes(save(state, metadata=md))
    except Exception:  # safetensors itself refuses to write this metadata: nothing to load
        return
    try:
        load_artifact(path)
    except EdgeguardError as e:
        assert "\n" not in str(e)
