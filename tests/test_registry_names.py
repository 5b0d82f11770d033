"""One home for the list of methods and of their hyper-parameters: the registry (align/optim/registry.py).

Before issue 24 the methods were listed in four places and their hyper-parameters in five, so a new method had to be
added to each. This test reads every module of align/ and cli/ (AST) and fails on a literal list, tuple, set or
dict (keys) that names two or more registry entries, or two or more method hyper-parameters, anywhere but in the
registry: derive such a list from ``align.optim.registry`` instead (``OPTIMIZERS``, ``TWO_PASS_METHODS``,
``DEFAULT_GRID``, ``METHOD_HPARAMS``, ``METHOD_AXES``, ``AXIS_SYMBOLS``, an entry's ``hparams``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from align.optim.registry import METHOD_HPARAMS, OPTIMIZERS

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "align" / "optim" / "registry.py"
SOURCES = sorted(p for p in [*REPO.glob("align/**/*.py"), *REPO.glob("cli/*.py")] if p != REGISTRY)
# Selections, not lists of the methods: the paper's Figures 2-4 compare SAM and M-SAM (with GD in Figure 3), and
# their toy experiments keep that choice by default (file, function whose defaults name them).
SELECTIONS = {("align/toy/experiments.py", "sinc_experiment"), ("align/toy/experiments.py", "paraboloid_experiment"),
              ("align/toy/experiments.py", "stability_experiment")}


def _functions(tree: ast.AST) -> dict[int, str]:
    """The innermost function around each node (by id)."""
    where: dict[int, str] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                where[id(node)] = func.name
    return where


def name_lists(tree: ast.AST, path: str = "") -> list[tuple[int, str, list[str]]]:
    """(line, kind, names) of every literal collection holding two or more method or hyper-parameter names."""
    found = []
    where = _functions(tree)
    for node in ast.walk(tree):
        if (path, where.get(id(node))) in SELECTIONS:
            continue
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        words = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        for kind, names in (("methods", set(OPTIMIZERS)), ("method hyper-parameters", set(METHOD_HPARAMS))):
            hits = sorted({w for w in words if w in names})
            if len(hits) >= 2:
                found.append((node.lineno, kind, hits))
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_list_of_method_or_hyper_parameter_names_outside_the_registry(path):
    found = name_lists(ast.parse(path.read_text()), str(path.relative_to(REPO)))
    assert not found, "; ".join(f"{path.relative_to(REPO)}:{line} lists {kind} {names}: derive it from "
                                "align.optim.registry" for line, kind, names in found)


def test_the_check_sees_the_lists_it_is_about():
    """The forms the lists took before the registry carried them are caught (so the test is not vacuous)."""
    samples = {'METHODS = ("none", "sam", "msam", "asam", "fsam")': "methods",
               'METHOD_AXES = ("eta", "alpha", "metric_beta")': "method hyper-parameters",
               'AXIS_LABELS = {"eta": "η", "alpha": "α"}': "method hyper-parameters",
               'buffers = 2 if base in ("adam", "adamw") else 1': "methods",
               'def f(methods=("gd", "sam", "msam")): pass': "methods"}
    for source, kind in samples.items():
        assert [k for _, k, _ in name_lists(ast.parse(source))] == [kind], source
    assert not name_lists(ast.parse('x = ("sam", "M-SAM"); y = {"rho": 1}; z = ("perturbed", "all_trainable")'))
