"""The wheel: align, align.cli (from cli/) and every YAML of configs/ inside the package, no top-level cli; the
installed package runs `align compare --dry-run` and `align configs` from an empty folder."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "align", "cli", "configs")
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]  # with --no-index: never the network


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a clean copy of the sources (no stale build/ folder can leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([*PIP, "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=120)
    (found,) = (tmp / "dist").glob("align-*.whl")
    return found


def test_the_wheel_holds_the_package_the_cli_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in REPO.glob("align/**/*.py") if "__pycache__" not in p.parts}
    expected |= {"align/cli/" + p.name for p in REPO.glob("cli/*.py")}
    expected |= {"align/" + p.relative_to(REPO).as_posix() for p in REPO.glob("configs/**/*.yaml")}
    expected |= {"align/configs/__init__.py"}
    assert expected <= names, sorted(expected - names)
    assert len([n for n in expected if n.endswith(".yaml")]) >= 16
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"align"}, tops  # no top-level cli/ or configs/
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "align = align.cli.main:app" in entry_points


def test_the_installed_wheel_runs_from_an_empty_folder(wheel, tmp_path):
    target, cwd = tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    subprocess.run([*PIP, "install", "--no-index", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}  # the checkout is NOT on the path
    env.pop("ALIGN_HOME", None)

    def align(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "align.cli.main", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    code = "import align, align.cli.main as m, align.configs as c; print(align.__file__, m.__file__, c.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=60).stdout.split()
    assert len(where) == 3 and all(Path(w).is_relative_to(target) for w in where), where
    assert '"study_dir": "data/studies/default"' in align("compare", "--dry-run")
    listing = align("configs")
    assert str(target / "align" / "configs") in listing.replace("\n", "")
    assert "synthetic_offline" in listing and "flickr30k_vitb32_msam" in listing
    assert not any(cwd.iterdir())  # a dry run and a listing write nothing


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("align/**/*.py")))
def test_the_library_never_imports_align_cli(path):
    tree = ast.parse((REPO / path).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    assert not [m for m in modules if m == "align.cli" or m.startswith("align.cli.")], path
