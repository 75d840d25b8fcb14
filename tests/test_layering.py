"""The layers: runtime imports neither torch nor the host packages; converters never import edgeguard."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.') or name == 'torchvision':
            raise ImportError('torch is blocked in this test')
        return None
sys.meta_path.insert(0, _Block())
"""


def _imports(pkg: str) -> set[str]:
    found = set()
    for f in (REPO / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def _modules(pkg: str) -> list[str]:
    """Every module of a package, sub-packages included (runtime/backends/…)."""
    out = []
    for f in sorted((REPO / pkg).rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def test_runtime_imports_without_torch():
    mods = _modules("runtime")
    assert "runtime.backends.onnxruntime_backend" in mods and "runtime.backends.tensorrt_backend" in mods
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in mods) + \
        "assert 'torch' not in sys.modules and 'edgeguard' not in sys.modules\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_import_direction():
    assert not _imports("runtime") & {"torch", "torchvision", "edgeguard", "converters"}
    assert "edgeguard" not in _imports("converters")


def _edgeguard_imports(sub: str) -> set[str]:
    """Every edgeguard module that files under edgeguard/SUB import (relative imports resolved, local imports
    inside functions included)."""
    found = set()
    for f in (REPO / "edgeguard" / sub).rglob("*.py"):
        pkg = list(f.relative_to(REPO).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - node.level + 1]
                    found.add(".".join(base + ([node.module] if node.module else [])))
                elif node.module:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
    return found


def test_methods_and_evaluation_never_import_each_other():
    """Methods do not grade themselves; the evaluation does not reach into a method. What both need (the
    attacker's moves, BN statistics, drawing) lives below them."""
    up = {m for m in _edgeguard_imports("methods") if m.startswith("edgeguard.evaluation")}
    down = {m for m in _edgeguard_imports("evaluation") if m.startswith("edgeguard.methods")}
    assert not up, f"methods import the evaluation: {sorted(up)}"
    assert not down, f"the evaluation imports methods: {sorted(down)}"
    assert "edgeguard.finetune" in _edgeguard_imports("methods") & _edgeguard_imports("evaluation")


def test_the_attacker_lives_below_methods_and_evaluation():
    """One attacker: the fine-tuning package imports neither what simulates it nor what grades with it, and no
    module above it builds its own optimizer loop for an attack (the hardening runs `finetune.train_run`)."""
    below = _edgeguard_imports("finetune")
    assert not {m for m in below if m.startswith(("edgeguard.methods", "edgeguard.evaluation"))}, sorted(below)
    harden = (REPO / "edgeguard" / "methods" / "harden.py").read_text()
    assert "train_run(" in harden and "ATTACK_SPACE" in harden
    assert "torch.optim.SGD" not in harden and "torch.optim.AdamW" not in harden
    suites = (REPO / "edgeguard" / "evaluation" / "suites.py").read_text()
    assert "ATTACK_SPACE" in suites


def test_no_long_functions_where_the_attack_and_the_methods_live():
    """Functions in methods/, evaluation/, finetune/ and converters/bundle.py stay at 80 lines or fewer, each
    split by job."""
    files = [f for sub in ("methods", "evaluation", "finetune") for f in (REPO / "edgeguard" / sub).rglob("*.py")]
    files.append(REPO / "converters" / "bundle.py")
    long = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{f.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
