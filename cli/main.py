"""The ``align`` command: each command group lives in its own module and registers itself here.

The command modules import only light modules at their top (typer, rich, ``align.cli.common``, and the parts of
``align.common`` that load no torch); the library, which loads torch (seconds), is imported inside the commands,
each such import marked "loads torch: not for --help". ``align --help`` so stays well under a second
(``tests/test_layers.py`` checks that it loads no torch).
"""
from __future__ import annotations

import typer

from align.cli import cache, compare, configs, embed, evaluate, search, toy, train
from align.cli.common import OneLineUsageErrors

app = typer.Typer(
    name="align",
    help="Align frozen vision and text encoders with sharpness-aware optimizers (SAM, M-SAM, ASAM, Fisher SAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,  # a usage error is one `error:` line with the command's usage, exit 2
)

for module in (toy, embed, cache, train, evaluate, search, compare, configs):
    module.register(app)

if __name__ == "__main__":
    app(prog_name="align")  # `python -m align.cli.main` is the same command as `align`
