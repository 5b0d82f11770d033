"""Usage errors of the command line (an unknown command or value, a missing option, an option without its value)
are one `error:` line with the usage of the command they concern and where its help is, exit code 2 — not typer's
5-line box. Help itself (`align`, `align cache`, `--help`) is unchanged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli.main import app
from faults import one_error_line

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# argv → (what the line says is wrong, the command whose usage it gives)
CASES = {
    "toy nope": ("'nope' is not one of 'banana', 'sinc', 'paraboloid', 'stability', 'grid', 'all'", "align toy"),
    "configs nope": ("unexpected extra argument", "align configs"),
    "nope": ("No such command 'nope'", "align"),
    "train": ("Missing option '--config'", "align train"),
    "compare --pack": ("Option '--pack' requires an argument", "align compare"),
    "train --config x --bogus": ("No such option: --bogus", "align train"),
    "eval --knn-k many": ("Invalid value for '--knn-k'", "align eval"),
    "toy grid --max-steps 0": ("Invalid value for '--max-steps'", "align toy"),
    "cache nope": ("No such command 'nope'", "align cache"),
    "cache rm": ("Missing argument 'key'", "align cache rm"),
    "cache rm --bogus": ("No such option: --bogus", "align cache rm"),
    "--bogus": ("No such option: --bogus", "align"),
}


@pytest.mark.parametrize("args", list(CASES))
def test_a_usage_error_is_one_error_line_with_the_commands_usage_not_a_box(args):
    wrong, command = CASES[args]
    line = one_error_line(runner.invoke(app, args.split()))
    assert wrong in line and f"(usage: {command} [OPTIONS]" in line and line.endswith(f"; see {command} --help)"), line
    assert "Value error" not in line and "╭" not in line


def test_the_installed_command_prints_the_same_single_line_on_stderr():
    """The real entry point (not the test runner): stderr is the one line, stdout empty."""
    proc = subprocess.run([sys.executable, "-m", "align.cli.main", "toy", "nope"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for 'experiment': 'nope' is not one of "), lines
    assert lines[0].endswith("(usage: align toy [OPTIONS] [experiment]; see align toy --help)"), lines


@pytest.mark.parametrize("args", [[], ["cache"], ["--help"], ["toy", "--help"]])
def test_help_is_still_the_help(args):
    result = runner.invoke(app, args)
    assert "Usage: align" in " ".join(result.output.split()) and "error:" not in result.output, result.output
