"""The import directions of design.md, checked by reading the source (AST), plus a fast `align --help`."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ["align/optim/sam.py", "align/optim/registry.py", "align/losses.py", "align/heads.py", "align/knn.py",
        "align/metrics/retrieval.py", "align/metrics/alignment.py", "align/metrics/sharpness.py", "align/toy.py",
        "align/study_stats.py", "align/embeddings.py"]
EDGES = {"align.encoders", "align.datasets", "align.cache", "align.runs", "align.plots", "align.report",
         "align.toy_plots", "align.train", "align.evaluate", "align.compare"}
HEAVY = {"open_clip", "transformers", "datasets", "faiss", "matplotlib", "scipy", "sklearn"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("align/**/*.py")))
def test_the_library_never_imports_the_cli(path):
    assert not [m for m, _ in imports(REPO / path) if m == "cli" or m.startswith("cli.")]


@pytest.mark.parametrize("path", CORE)
def test_core_math_imports_no_edge_or_orchestration_module_and_does_no_io(path):
    found = imports(REPO / path)
    assert not [m for m, _ in found if m in EDGES], f"{path} imports an edge module"
    source = (REPO / path).read_text()
    for io_call in ("open(", "write_text(", "read_text(", "print("):
        assert f" {io_call}" not in source and f"\t{io_call}" not in source and f"={io_call}" not in source, io_call


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
