"""The layers of the README's architecture section, checked by reading the source (AST), plus a fast `align --help`.

Every module of align/ is filed in exactly one layer; a new module that is not filed fails the test, so the table
(and the README's) stays complete. Imports inside functions count: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The packages in pipeline order. Each may import only the packages it names (and itself): the folders are the
# dependency graph, and it has no cycle (test_the_package_graph_is_acyclic).
PACKAGES = {
    "align.common": set(),                    # errors, config, paths, device, progress, distributed, files, locks
    "align.optim": {"align.common"},          # the optimizers
    "align.data": {"align.common"},           # datasets and frozen encoders
    "align.cache": {"align.data", "align.common"},  # embeddings on disk
    "align.metrics": {"align.cache", "align.common"},  # pure measurements of embeddings and heads
    "align.train": {"align.optim", "align.metrics", "align.cache", "align.data", "align.common"},
    "align.eval": {"align.train", "align.metrics", "align.cache", "align.data", "align.common"},
    "align.study": {"align.train", "align.eval", "align.metrics", "align.cache", "align.data", "align.optim",
                    "align.common"},
    "align.toy": {"align.optim", "align.common"},  # the paper's 2-D experiments
}
# Top-level modules: the package's docstring, and the old import paths that scripts use (re-exports only).
COMPAT = {"align": set(), "align.losses": {"align.train.losses"}, "align.study_stats": {"align.study.stats"}}
# The role of every module besides its package. core: pure tensor math, which imports only core and common modules;
# orchestration: composes the others and makes no I/O call of its own; edge: touches disk, network, encoders,
# plots. common modules import only common modules. Every module is filed in exactly one role.
ROLES = {
    "core": {"align.optim", "align.optim.registry", "align.optim.step", "align.optim.hparams", "align.optim.two_pass",
             "align.optim.stacked", "align.optim.batched", "align.optim.sam", "align.optim.msam", "align.optim.asam",
             "align.optim.fsam", "align.optim.gsam", "align.optim.friendly_sam", "align.optim.looksam",
             "align.optim.lion",
             "align.cache.embeddings",
             "align.metrics", "align.metrics.retrieval", "align.metrics.alignment", "align.metrics.sharpness",
             "align.metrics.knn", "align.metrics.zeroshot", "align.metrics.measure",
             "align.train.heads", "align.train.losses", "align.train.blockwise", "align.train.pack",
             "align.train.checkpoint", "align.train.identity", "align.train.collapse",
             "align.study.cells", "align.study.stats", "align.study.seed_noise", "align.study.invariance",
             "align.toy.experiments",
             "align.losses", "align.study_stats"},
    "orchestration": {"align.train.config", "align.train.memory", "align.train.run_data", "align.train.loop",
                      "align.train.batches",
                      "align.train.optimizer", "align.train.run", "align.train.evaluation",
                      "align.eval.evaluate", "align.eval.trained", "align.eval.search", "align.study.config",
                      "align.study.packing", "align.study.workers", "align.study.compare"},
    "edge": {"align.data.datasets", "align.data.caption_set", "align.data.source_columns", "align.data.source_local",
             "align.data.source_hub", "align.data.encoders", "align.data.encoder_spec", "align.data.encoder_weights",
             "align.data.backend_common", "align.data.backend_open_clip", "align.data.backend_transformers",
             "align.data.backend_offline", "align.data.synthetic", "align.data.mnist",
             "align.data.hub", "align.data.source_wds", "align.cache.key", "align.cache.read", "align.cache.work",
             "align.cache.encode", "align.cache.tar_work", "align.cache.tar_encode",
             "align.cache.write", "align.cache.store", "align.cache.importing",
             "align.train.run_dir", "align.train.tracking", "align.eval.plots", "align.study.studies", "align.study.report",
             "align.study.beside", "align.study.plots", "align.study.invariance_report", "align.toy.plots"},
    "common": {"align.common.errors", "align.common.config", "align.common.paths", "align.common.device",
               "align.common.progress", "align.common.distributed", "align.common.files", "align.common.locks",
               "align.common.config_files", "align.common.figures"},
}
PACKAGE_INITS = {"align"} | {p for p in PACKAGES if p not in ROLES["core"]}  # docstring only: no code, no imports
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


def role_of(module: str) -> str:
    found = [name for name, members in ROLES.items() if module in members]
    assert len(found) == 1, f"{module} must be filed in exactly one role of tests/test_layers.py (and the README)"
    return found[0]


def package_of(module: str) -> str:
    """The package a module belongs to (align.train.loop → align.train), or the module itself at the top."""
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    assert module in COMPAT, f"{module} is in no package of tests/test_layers.py"
    return module


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in a file; `from align.train import runs` counts as align.train.run_dir."""
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


def test_every_library_module_is_filed_in_one_role_and_one_package():
    for module in LIBRARY:
        if module in PACKAGE_INITS:
            continue
        role_of(module)
        package_of(module)
    filed = set().union(*ROLES.values())
    assert not {m for m in filed if m not in LIBRARY}, "stale entries"
    assert set(PACKAGES) | set(COMPAT) >= {m for m in LIBRARY if m.count(".") <= 1}, "a package is not listed"


@pytest.mark.parametrize("package", sorted(PACKAGE_INITS - {"align"}))
def test_package_inits_hold_a_docstring_only(package):
    """Importing one module of a package never loads its siblings (a train config loads no cache writer)."""
    tree = ast.parse(LIBRARY[package].read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"{package}/__init__.py holds code"
    assert len(ast.get_docstring(tree).splitlines()) >= 2, f"{package}/__init__.py: say what it holds and imports"


def test_the_top_package_holds_its_docstring_and_the_lazy_api_only():
    """``import align`` stays light: besides its docstring, align/__init__.py maps the API's names to the modules
    that hold them (``_LAZY``), imported on first use by its ``__getattr__``; nothing else runs at import."""
    import align

    tree = ast.parse(LIBRARY["align"].read_text())
    kinds = [type(node).__name__ for node in tree.body]
    assert kinds == ["Expr", "ImportFrom", "Assign", "Assign", "FunctionDef", "FunctionDef"], kinds
    assert [f.name for f in tree.body if isinstance(f, ast.FunctionDef)] == ["__getattr__", "__dir__"]
    assert tree.body[1].module == "importlib"
    for name, module in align._LAZY.items():
        assert module in LIBRARY and role_of(module) in ("orchestration", "common"), (name, module)
        assert getattr(align, name) is getattr(importlib.import_module(module), name)
    assert set(align.__all__) == set(align._LAZY)


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_imports_follow_the_packages(module):
    package = package_of(module)
    allowed = COMPAT.get(package) if package in COMPAT else PACKAGES[package] | {package}
    bad = sorted(m for m in align_imports(LIBRARY[module]) if package_of(m) not in allowed and m not in allowed)
    assert not bad, f"{module} ({package}) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in LIBRARY if m not in PACKAGE_INITS))
def test_imports_follow_the_roles(module):
    """core imports only core and common modules; common only common; nothing imports orchestration but
    orchestration (and the CLI)."""
    role = role_of(module)
    may = {"core": {"core", "common"}, "common": {"common"}, "edge": {"core", "common", "edge"},
           "orchestration": {"core", "common", "edge", "orchestration"}}[role]
    bad = sorted(m for m in align_imports(LIBRARY[module]) if m not in PACKAGE_INITS and role_of(m) not in may)
    assert not bad, f"{module} ({role}) imports {bad}"


def test_the_package_graph_is_acyclic():
    assert find_cycle({p: set(d) for p, d in PACKAGES.items()}) is None


@pytest.mark.parametrize("module", sorted(m for m in LIBRARY if m not in PACKAGE_INITS
                                          and role_of(m) in ("core", "orchestration")))
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


def function_level_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the line's trailing comment or '') of every import inside a function or class."""
    source = path.read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            line = lines[node.end_lineno - 1]
            found.append((node.lineno, module or "", line.split("#", 1)[1].strip() if "#" in line else ""))
    return found


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_a_modules_header_shows_its_dependencies(module):
    """align's own modules are imported at the top (a lazy import hides a dependency); inside a function only a
    heavy third-party library, with its reason on the line."""
    found = function_level_imports(LIBRARY[module])
    own = [f"{n}: {m}" for n, m, _ in found if m == "align" or m.startswith("align.")]
    silent = [f"{n}: {m}" for n, m, why in found if not why]
    assert not own, f"{module} imports align modules inside functions: {own}"
    assert not silent, f"{module}: say on the line why these imports are lazy: {silent}"


@pytest.mark.parametrize("module", sorted(CLI))
def test_the_cli_imports_the_library_inside_its_commands_and_says_so(module):
    """The command modules keep ``align --help`` free of torch: a library import sits inside the command, and the
    first of each group says why."""
    found = function_level_imports(CLI[module])
    groups: dict[int, list] = {}
    for n, m, why in found:
        start = next((g for g in groups if n - max(x for x, *_ in groups[g]) <= 1), n)
        groups.setdefault(start, []).append((n, m, why))
    source = CLI[module].read_text().splitlines()
    silent = [f"{g}: {items[0][1]}" for g, items in groups.items()
              if not any(why for _, _, why in items) and not source[g - 2].strip().startswith("#")]
    assert not silent, f"{module}: say why these imports are inside the function: {silent}"


def test_align_help_is_fast_and_lists_every_command():
    """The command modules import the library (which loads torch, several seconds) inside their commands only."""
    code = ("import sys, time; t = time.perf_counter(); from typer.testing import CliRunner; "
            "from align.cli.main import app; r = CliRunner().invoke(app, ['--help']); "
            "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers', 'datasets', 'faiss', 'matplotlib') "
            "if m in sys.modules); "
            "print(r.exit_code, heavy, round(time.perf_counter() - t, 2)); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    first, rest = out.split("\n", 1)
    assert first.startswith("0 []"), first
    for command in ("toy", "embed", "cache", "train", "eval", "search", "compare"):
        assert command in rest


def test_the_checks_catch_planted_violations(tmp_path):
    """The scanners see what the issue found missed before: torch.save, np.save, .open(, write_bytes, lazy imports."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import numpy as np\nimport torch\n"
        "def f(path, x):\n"
        "    from align.train import run_dir\n"
        "    from align.train.loop import train\n"
        "    torch.save(x, path)\n    np.save(path, x)\n    path.write_bytes(b'')\n"
        "    with path.open('w') as fh:\n        fh.write('x')\n    json.dump(x, fh)\n    print(x)\n"
        "    return x.sum()\n")
    calls = [c.split(": ")[1] for c in io_calls(planted)]
    assert calls == ["torch.save", "np.save", "path.write_bytes", "path.open", "fh.write", "json.dump", "print"]
    assert {m for m, at_top in imports(planted) if not at_top} == {"align.train.run_dir", "align.train.loop"}
    assert function_level_imports(planted) == [(4, "align.train", ""), (5, "align.train.loop", "")]
