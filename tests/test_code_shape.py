"""Shape rules a newcomer can rely on: short functions, and one meaning per public function name."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60
SOURCES = sorted([*REPO.glob("align/**/*.py"), *REPO.glob("cli/*.py")])


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """Functions (methods and nested ones included) longer than ``limit`` lines, decorators excluded."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_longer_than_60_lines():
    found = [f for path in SOURCES for f in long_functions(path)]
    assert not found, "split these into named pieces: " + "; ".join(found)


def test_the_length_check_counts_nested_functions(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    planted = tmp_path / "planted.py"
    planted.write_text(f"def outer():\n    def inner():\n{body}\n    return inner\n")
    assert [f.split(" ")[1] for f in long_functions(planted)] == ["outer", "inner"]


def public_functions(path: Path) -> list[str]:
    """Names of a module's top-level public functions."""
    tree = ast.parse(path.read_text())
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not n.name.startswith("_")]


def test_no_two_public_functions_share_a_name():
    # The CLI's `register(app)` is the one deliberate exception: each command module exposes the same hook.
    where = defaultdict(list)
    for path in REPO.glob("align/**/*.py"):
        for name in public_functions(path):
            where[name].append(path.relative_to(REPO).as_posix())
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, f"public functions defined in several modules (give each meaning its own name): {shared}"
