"""The README's commands, exactly as written there: every `edgeguard` and `edgeguard-runtime` line of its bash
blocks parses with the real command-line parsers (a renamed or removed option fails here), and the set-up's
main job (`edgeguard demo`) and `edgeguard keygen --out vendor` run for real."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from edgeguard.cli import main
from runtime.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Each `edgeguard …` / `edgeguard-runtime …` command of README.md's bash blocks (continuations joined,
    comments dropped, `a && b` split)."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmd: list[str] = []
            for w in [*shlex.split(line, comments=True), "&&"]:
                if w != "&&":
                    cmd.append(w)
                    continue
                if cmd and cmd[0] in ("edgeguard", "edgeguard-runtime"):
                    out.append(cmd)
                cmd = []
    return out


COMMANDS = readme_commands()


def _touch_paths(words: list[str], where: Path) -> None:
    """Files a command names exist (empty), as they would after the README's earlier steps."""
    for w in words:
        if re.search(r"\.(safetensors|key|pub|png|toml)$", w):
            (where / w).parent.mkdir(parents=True, exist_ok=True)
            (where / w).touch()
        elif w.endswith("/"):
            (where / w).mkdir(parents=True, exist_ok=True)


def test_the_readme_has_its_commands():
    firsts = {tuple(c[:2]) for c in COMMANDS}
    for cmd in ("train", "protect", "evaluate", "keygen", "build", "deploy", "demo"):
        assert ("edgeguard", cmd) in firsts, cmd
    assert ("edgeguard-runtime", "validate") in firsts


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch_paths(words, tmp_path)
    if words[0] == "edgeguard-runtime":
        args = build_parser().parse_args(words[1:])  # a bad option exits 2 (SystemExit fails the test)
        assert args.fn is not None
        return
    ctx = main.make_context("edgeguard", words[1:])
    with ctx:
        name, cmd, rest = main.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert cmd is not None, words
        try:
            cmd.make_context(name, rest, parent=ctx)
        except click.UsageError as e:
            pytest.fail(f"README command {' '.join(words)!r} does not parse: {e.format_message()}")


def _console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_setup_demo_and_keygen_run_as_written(tmp_path):
    """`edgeguard demo` (the set-up's main job) and `edgeguard keygen --out vendor`, in a fresh folder."""
    demo = next(c for c in COMMANDS if c[:2] == ["edgeguard", "demo"])
    keygen = next(c for c in COMMANDS if c[:2] == ["edgeguard", "keygen"])
    env = {**os.environ, "EDGEGUARD_CACHE": str(tmp_path / "cache"), "EDGEGUARD_PROGRESS": "0"}
    for words in (keygen, demo):
        r = subprocess.run([_console_script(words[0]), *words[1:]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, (words, (r.stdout + r.stderr)[-2000:])
    assert (tmp_path / "vendor.key").exists() and (tmp_path / "vendor-ota.pub").exists()
    assert (tmp_path / "edgeguard-demo" / "report" / "report.md").exists()
    assert (tmp_path / "edgeguard-demo" / "validate.json").exists()
