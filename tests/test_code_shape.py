"""Shape rules a newcomer can rely on: short files, classes and functions, few parameters, and one meaning per
public function name (align/ and cli/)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60  # a function
MAX_CLASS_LINES = 250
MAX_FILE_LINES = 600
MAX_PARAMETERS = 8
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


def long_classes(path: Path, limit: int = MAX_CLASS_LINES) -> list[str]:
    """Classes (nested ones included) longer than ``limit`` lines, decorators excluded."""
    return [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit]


def is_command(node: ast.FunctionDef) -> bool:
    """A typer command (``@app.command(...)``): its parameters are the command's declared options, one per flag
    of ``align CMD --help``, not values threaded through the code, so the parameter rule leaves it out."""
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in node.decorator_list)


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Every parameter a caller can pass (positional, keyword-only, *args, **kwargs), self and cls not counted."""
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len([n for n in names if n not in ("self", "cls")])


def many_parameters(path: Path, limit: int = MAX_PARAMETERS) -> list[str]:
    return [f"{path.name}:{node.lineno} {node.name} ({parameter_count(node)} parameters)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_command(node)
            and parameter_count(node) > limit]


def test_no_file_is_longer_than_600_lines():
    found = [f"{p.relative_to(REPO)} ({n} lines)" for p in SOURCES
             if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not found, "split these into modules with one job each: " + "; ".join(found)


def test_no_class_is_longer_than_250_lines():
    found = [f for path in SOURCES for f in long_classes(path)]
    assert not found, "an object with too many jobs: " + "; ".join(found)


def test_no_function_is_longer_than_60_lines():
    found = [f for path in SOURCES for f in long_functions(path)]
    assert not found, "split these into named pieces: " + "; ".join(found)


def test_no_function_takes_more_than_8_parameters():
    found = [f for path in SOURCES for f in many_parameters(path)]
    assert not found, "state threaded through parameters wants an object: " + "; ".join(found)


def test_the_checks_see_planted_violations(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    planted = tmp_path / "planted.py"
    planted.write_text(f"def outer():\n    def inner():\n{body}\n    return inner\n")
    assert [f.split(" ")[1] for f in long_functions(planted)] == ["outer", "inner"]
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(84))
    planted.write_text(f"class Big:\n{methods}\nclass Small:\n    pass\n")
    assert [f.split(" ")[1] for f in long_classes(planted)] == ["Big"]
    planted.write_text("def f(a, b, c, d, e, f, g, h):\n    pass\n"
                       "def g(self, a, b, c, d, e, f, g, *h):\n    pass\n"
                       "def h(a, b, c, d, e, f, g, *, h, **i):\n    pass\n"
                       "@app.command('x')\ndef cmd(a, b, c, d, e, f, g, h, i, j):\n    pass\n")
    assert [f.split(" ")[1] for f in many_parameters(planted)] == ["h"]


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
