"""The layers of the README's architecture section, checked by reading the source (AST), plus a fast `align --help`.

Every module of align/ is filed in exactly one layer; a new module that is not filed fails the test, so the table
(and the README's) stays complete. Imports inside functions count: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = {
    "core": {"align.optim", "align.optim.sam", "align.optim.registry", "align.optim.step",
             "align.optim.defaults", "align.losses",
             "align.optim.batched", "align.pack",
             "align.heads", "align.knn", "align.metrics", "align.zeroshot", "align.metrics.retrieval", "align.metrics.alignment",
             "align.metrics.sharpness", "align.toy", "align.study_stats", "align.embeddings", "align.measure"},
    "shared": {"align", "align.config", "align.errors", "align.device", "align.progress", "align.paths",
               "align.distributed"},
    "orchestration": {"align.train", "align.train_config", "align.evaluate", "align.compare"},
    "edge": {"align.encoders", "align.datasets", "align.synthetic", "align.mnist", "align.cache", "align.runs",
             "align.report", "align.plots", "align.eval_plots", "align.toy_plots", "align.files", "align.hub",
             "align.config_files", "align.locks"},
}
# What each layer may import from align/ (besides itself).
MAY_IMPORT = {
    "core": {"core", "shared"},
    "shared": {"shared"},
    "orchestration": {"core", "shared", "orchestration", "edge"},
    "edge": {"core", "shared", "edge"},
}
HEAVY = {"open_clip", "transformers", "datasets", "faiss", "matplotlib", "scipy", "sklearn"}
# Calls that read or write files or the terminal. Core and orchestration make none of them: they go through edges.
IO_NAMES = {"open", "print", "input"}
IO_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes", "write", "save", "savez", "savefig", "dump",
              "open", "mkdir", "unlink", "rmdir", "touch", "rename", "exists", "is_file", "is_dir", "iterdir",
              "glob", "rglob", "stat"}
IO_FUNCTIONS = {"os.remove", "os.replace", "os.rename", "os.makedirs", "os.listdir", "np.save", "np.load",
                "numpy.save", "numpy.load", "torch.save", "torch.load", "json.dump", "json.load", "shutil.rmtree",
                "shutil.copy", "shutil.move"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "cli":  # installed as align.cli
        parts.insert(0, "align")
    return ".".join(parts)


LIBRARY = {module_name(p): p for p in sorted(REPO.glob("align/**/*.py"))}
CLI = {module_name(p): p for p in sorted(REPO.glob("cli/*.py"))}


def layer_of(module: str) -> str:
    found = [name for name, members in LAYERS.items() if module in members]
    assert len(found) == 1, f"{module} must be filed in exactly one layer of tests/test_layers.py (and the README)"
    return found[0]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in a file; `from align import runs` counts as align.runs."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in LIBRARY or sub in CLI else node.module, id(node) in top_level))
    return found


def align_imports(path: Path) -> set[str]:
    return {m for m, _ in imports(path) if m == "align" or m.startswith("align.")} - {module_name(path)}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def io_calls(path: Path) -> list[str]:
    """Every call in a file that reads or writes files or the terminal, as `line: call`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if (isinstance(node.func, ast.Name) and name in IO_NAMES) or name in IO_FUNCTIONS or (
                isinstance(node.func, ast.Attribute) and node.func.attr in IO_METHODS):
            found.append((node.lineno, node.col_offset, f"{node.lineno}: {name}"))
    return [text for *_, text in sorted(found)]


def test_every_library_module_is_filed_in_one_layer():
    for module in LIBRARY:
        layer_of(module)
    filed = set().union(*LAYERS.values())
    assert not {m for m in filed if m not in LIBRARY}, "stale entries"


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_imports_follow_the_layers(module):
    layer = layer_of(module)
    bad = sorted(m for m in align_imports(LIBRARY[module])
                 if not m.startswith("align.cli") and layer_of(m) not in MAY_IMPORT[layer] | {layer})
    assert not bad, f"{module} ({layer}) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in LIBRARY if layer_of(m) in ("core", "orchestration")))
def test_core_and_orchestration_do_no_io_of_their_own(module):
    calls = io_calls(LIBRARY[module])
    assert not calls, f"{module} does I/O itself (go through an edge module): {calls}"


@pytest.mark.parametrize("module", sorted(CLI))
def test_the_cli_reads_and_writes_no_files_itself(module):
    calls = [c for c in io_calls(CLI[module]) if not c.endswith((": print", ".print"))]
    assert not calls, f"{module} does file I/O itself (call the library): {calls}"


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_the_library_never_imports_the_cli(module):
    assert not [m for m in align_imports(LIBRARY[module]) if m == "cli" or m.startswith(("cli.", "align.cli"))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a directed graph as [a, b, ..., a], or None (depth-first search with colours)."""
    colour = {node: 0 for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_planted_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_library():
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules on it.
    graph = {m: {d for d in align_imports(p) if d in LIBRARY and not m.startswith(d + ".")}
             for m, p in LIBRARY.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("align/**/*.py"),
                                                                              *REPO.glob("cli/*.py")]))
def test_heavy_libraries_are_imported_inside_functions_only(path):
    top = [m for m, at_top in imports(REPO / path) if at_top and m.split(".")[0] in HEAVY]
    assert not top, f"{path} imports {top} at module level: import it inside the function that needs it"


def test_align_help_is_fast_and_lists_every_command():
    code = ("import sys, time; t = time.perf_counter(); from typer.testing import CliRunner; from align.cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); "
            "heavy = sorted(m for m in ('open_clip', 'transformers', 'datasets', 'faiss', 'matplotlib') if m in sys.modules); "
            "print(r.exit_code, heavy, round(time.perf_counter() - t, 2)); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    first, rest = out.split("\n", 1)
    assert first.startswith("0 []"), first
    for command in ("toy", "embed", "cache", "train", "eval", "compare"):
        assert command in rest


def test_the_checks_catch_planted_violations(tmp_path):
    """The scanners see what the issue found missed before: torch.save, np.save, .open(, write_bytes, lazy imports."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import numpy as np\nimport torch\n"
        "def f(path, x):\n"
        "    from align import runs\n"
        "    from align.train import train\n"
        "    torch.save(x, path)\n    np.save(path, x)\n    path.write_bytes(b'')\n"
        "    with path.open('w') as fh:\n        fh.write('x')\n    json.dump(x, fh)\n    print(x)\n"
        "    return x.sum()\n")
    calls = [c.split(": ")[1] for c in io_calls(planted)]
    assert calls == ["torch.save", "np.save", "path.write_bytes", "path.open", "fh.write", "json.dump", "print"]
    assert {m for m, at_top in imports(planted) if not at_top} == {"align.runs", "align.train"}
