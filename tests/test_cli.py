import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeguard.cli import main


def test_train_and_info_on_real_mnist(tmp_path, data_root):
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(main, ["train", "--arch", "small_cnn", "--domain", "usps", "--epochs", "1",
                                  "--out", str(out), "--device", "cpu", "--data-root", str(data_root)])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and out.exists()
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "small_cnn" in r.output and "usps" in r.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--domain", "nope", "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "unknown domain" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["train", "--arch", "alexnet", "--domain", "mnist_sample",
                             "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "unknown architecture" in r.output
    r = runner.invoke(main, ["info", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "no such file" in r.output
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    r = runner.invoke(main, ["info", str(tmp_path / "junk.safetensors")])
    assert r.exit_code == 2 and "safetensors" in r.output


def test_help_everywhere():
    for cmd in ([], ["train"], ["info"], ["domains"], ["demo"]):
        r = CliRunner().invoke(main, cmd + ["--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "edgeguard.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "edgeguard" in r.stdout


def test_protect_set_overrides_are_typed_and_checked():
    from edgeguard.cli import _parse_overrides
    from edgeguard.errors import EdgeguardError
    from edgeguard.methods.map import MapConfig
    from edgeguard.methods.ntp import NtpConfig

    got = _parse_overrides(["tgt_shift=1", "max_source=none", "epochs=3", "structure=2:4"], MapConfig)
    assert got == {"tgt_shift": 1.0, "max_source": None, "epochs": 3, "structure": "2:4"}
    assert _parse_overrides(["loss=mmd", "alpha=0.5"], NtpConfig) == {"loss": "mmd", "alpha": 0.5}
    for bad in ("tgt_shfit=1", "epochs=three", "novalue", "synth=3", "synth.nn=3", "synth.n=many"):
        with pytest.raises(EdgeguardError):
            _parse_overrides([bad], MapConfig)
    # a dotted key reaches the nested synthesis config
    got = _parse_overrides(["synth.n=128", "synth.init=noise", "synth.lr=0.05", "epochs=2"], MapConfig)
    assert got == {"synth": {"n": 128, "init": "noise", "lr": 0.05}, "epochs": 2}
