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
    from edgeguard.config import apply_overrides
    from edgeguard.errors import EdgeguardError
    from edgeguard.methods.map import MapConfig
    from edgeguard.methods.ntp import NtpConfig

    got = apply_overrides(MapConfig(), ["experimental.tgt_shift=1", "max_source=none", "epochs=3", "structure=2:4"])
    assert (got.experimental.tgt_shift, got.max_source, got.epochs, got.structure) == (1.0, None, 3, "2:4")
    got = apply_overrides(NtpConfig(), ["loss=fisher", "alpha=0.5", "experimental.sim_weight=1"])
    assert (got.loss, got.alpha, got.experimental.sim_weight) == ("fisher", 0.5, 1.0)
    with pytest.raises(EdgeguardError, match="mmd"):  # the removed ablation
        apply_overrides(NtpConfig(), ["loss=mmd"])
    from edgeguard.config import from_dict  # a config file written before the removal still loads
    assert from_dict(NtpConfig, {"loss": "fisher", "mmd_clip": 1.0, "mmd_ce_clip": 3.0}).loss == "fisher"
    for bad in ("tgt_shfit=1", "epochs=three", "novalue", "synth=3", "synth.nn=3", "synth.n=many", "setting=nope",
                "lr=nan", "epochs.x=1", "synth.init=sideways"):
        with pytest.raises(EdgeguardError):
            apply_overrides(MapConfig(), [bad])
    # a dotted key reaches the nested synthesis config; the rest keep their defaults
    got = apply_overrides(MapConfig(), ["synth.n=128", "synth.init=noise", "synth.lr=0.05", "epochs=2"])
    assert (got.synth.n, got.synth.init, got.synth.lr, got.synth.iterations, got.epochs) == (128, "noise", 0.05, 200, 2)


def test_methods_protect_json_and_config_roundtrip(tmp_path):
    """`edgeguard methods` lists three; protect --json prints one JSON object on stdout; --config reads back
    the OUT.config.json it wrote; bad settings and a source-domain target are one-line errors (exit 2)."""
    import json

    from edgeguard.source import train_source

    src = tmp_path / "src.safetensors"
    train_source("small_cnn", "mnist_sample", src, epochs=1, device="cpu", max_train=256)
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    r = runner.invoke(main, ["methods"])
    assert r.exit_code == 0 and all(m in r.output for m in ("map", "ntp", "magnitude"))
    r = runner.invoke(main, ["methods", "ntp"])
    assert r.exit_code == 0 and "experimental.sim_weight" in r.output and "float" in r.output
    r = runner.invoke(main, ["protect", "--method", "map", "--help-config"])
    assert r.exit_code == 0 and "synth.n" in r.output and "sparsity_cap" in r.output
    out = tmp_path / "mag.safetensors"
    args = ["protect", "--method", "magnitude", "--source-model", str(src), "--target", "usps_sample",
            "--set", "sparsity=0.3", "--device", "cpu"]
    r = runner.invoke(main, [*args, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["method"] == "magnitude" and got["config"]["sparsity"] == 0.3
    r = runner.invoke(main, ["protect", "--config", f"{out}.config.json", "--source-model", str(src),
                             "--out", str(tmp_path / "again.safetensors"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["sparsity"] == pytest.approx(got["sparsity"])
    for bad in (["--set", "sparsity=lots"], ["--set", "nope=1"], ["--setting", "source-free"]):
        r = runner.invoke(main, [*args, "--out", str(tmp_path / "bad.safetensors"), *bad])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    r = runner.invoke(main, ["protect", "--method", "map", "--source-model", str(src), "--target", "mnist_sample",
                             "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "authorised (source) domain" in r.output
    before = src.read_bytes()
    r = runner.invoke(main, [*args, "--out", str(src)])
    assert r.exit_code == 2 and "source model itself" in r.output and src.read_bytes() == before
    (tmp_path / "folder.safetensors").mkdir()
    r = runner.invoke(main, [*args, "--out", str(tmp_path / "folder.safetensors")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    for grid in ("0.1,,0.5", "", "0.5", "0,0.5", "0.1,nan"):
        r = runner.invoke(main, ["evaluate", str(out), "--target", "usps_sample", "--report", str(tmp_path / "rep"),
                                 "--grid", grid])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--grid" in r.output, (grid, r.output)


def test_long_run_in_a_log_shows_progress_and_files_follow_the_umask(tmp_path):
    """Not on a terminal, a run prints plain progress lines (here every 0 s); the files it writes get the
    user's umask (0644 under umask 022), the private key 0600."""
    import os
    import stat

    env = {**os.environ, "EDGEGUARD_PROGRESS_SECONDS": "0"}
    env.pop("EDGEGUARD_PROGRESS", None)
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); from edgeguard.cli import main; "
                            "main(sys.argv[1:])", "train", "--domain", "mnist_sample", "--epochs", "1",
                            "--out", str(tmp_path / "m.safetensors"), "--device", "cpu"],
                           stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "small_cnn/mnist_sample 1/1:" in text and "%" in text  # a progress line, not a bar
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    r = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); from edgeguard.cli import main; "
                        "main(sys.argv[1:])", "keygen", "--out", str(tmp_path / "vendor")], capture_output=True)
    assert r.returncode == 0
    assert stat.S_IMODE((tmp_path / "vendor.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "vendor.pub").stat().st_mode) == 0o644


def test_usage_errors_are_one_line_and_verbose_works_anywhere(tmp_path):
    runner = CliRunner()
    for args in (["train", "--domain", "mnist_sample", "--epochs", "0", "--out", str(tmp_path / "x.safetensors")],
                 ["evaluate", "m.safetensors", "--target", "usps", "--report", str(tmp_path), "--weight-decay", "-1"],
                 ["evaluate", "m.safetensors", "--target", "usps", "--report", str(tmp_path), "--grid", "abc,0.5"],
                 ["nope"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "Usage" not in r.output, r.output
    ckpt = tmp_path / "g.safetensors.ckpt"
    ckpt.write_bytes(b"garbage, or a pickle")
    r = runner.invoke(main, ["train", "--domain", "mnist_sample", "--epochs", "1", "--out",
                             str(tmp_path / "g.safetensors"), "--resume", "-v"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "checkpoint" in r.output
