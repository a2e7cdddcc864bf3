"""The house in layers: the package's import graph (function-local imports included) has no cycle and points only
down the pipeline; no function is over 60 lines; every module says what it is; the library needs no app; the
README's ``python -m cait.<tool>`` commands answer."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["layers", "data", "models", "compress", "baselines", "measure", "io", "finetune", "dense", "viz", "cli",
          "studio"]
"""The subpackages of ``cait`` bottom to top: a module may import from its own subpackage and from those below it.
``cait/__init__.py`` and the command entry points (``cait/bench.py``, ``cait/export.py``, ``__main__.py``) sit above
them all."""
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / "cait").rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level and inside functions)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):   # a package's own __init__ is not an edge back
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, f, modules) for m, f in modules.items()}


def _rank(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":                         # python -m entry points sit above everything, like the shims
        return len(LAYERS)
    if len(parts) > 1 and parts[1] in LAYERS and (len(parts) > 2 or (ROOT / "cait" / parts[1]).is_dir()):
        return LAYERS.index(parts[1])
    return len(LAYERS)                                  # cait itself and the command shims: the top


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return cycles


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to one in a higher layer."""
    def name(m: str) -> str:
        return LAYERS[_rank(m)] if _rank(m) < len(LAYERS) else "top"
    return [f"{m} ({name(m)}) imports {t} ({name(t)})" for m, targets in graph.items() for t in targets
            if _rank(t) > _rank(m)]


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 200     # the check saw the whole package
    assert _cycles(graph) == []


def test_imports_point_down_the_pipeline():
    assert _upward(_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"cait.io.hub": {"cait.io.checkpoint"}, "cait.io.checkpoint": {"cait.io.hub", "cait.models.deit"},
             "cait.models.deit": set(), "cait.measure.flops": {"cait.studio.pairs"}, "cait.studio.pairs": set()}
    assert _cycles(graph) == [["cait.io.checkpoint", "cait.io.hub"]]
    assert _upward(graph) == ["cait.measure.flops (measure) imports cait.studio.pairs (studio)"]


def test_no_function_over_sixty_lines():
    long = []
    for f in sorted((ROOT / "cait").rglob("*.py")) + [ROOT / "app.py"]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_every_module_says_what_it_is():
    missing = [str(f.relative_to(ROOT)) for f in _modules().values() if not ast.get_docstring(ast.parse(f.read_text()))]
    assert missing == []


def test_the_library_imports_without_the_app():
    code = ("import sys, cait, cait.finetune, cait.io.hub; "
            "print(sorted(m for m in ('gradio', 'cait.studio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("tool", ["finetune", "compress", "bench", "export"])
def test_readme_commands_answer(tool):
    out = subprocess.run([sys.executable, "-m", f"cait.{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"python -m cait.{tool}" in out.stdout                   # its own usage line, not another tool's
