"""Rules of the CLI layer that a reader of cli/ relies on: short functions (nested command functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("cli/*.py")))
def test_no_cli_function_is_longer_than_60_lines(path):
    tree = ast.parse((REPO / path).read_text())
    long = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - start + 1 > MAX_LINES:
                long[node.name] = node.end_lineno - start + 1
    assert not long, f"{path}: {long} lines; split them"
