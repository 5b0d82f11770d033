"""The ``align`` command: each command group lives in its own module and registers itself here.

Heavy libraries are imported inside the commands, so ``align --help`` stays fast.
"""
from __future__ import annotations

import typer

from align.cli import cache, compare, configs, embed, evaluate, toy, train

app = typer.Typer(
    name="align",
    help="Align frozen vision and text encoders with sharpness-aware optimizers (SAM, M-SAM, ASAM, Fisher SAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (toy, embed, cache, train, evaluate, compare, configs):
    module.register(app)

if __name__ == "__main__":
    app(prog_name="align")  # `python -m align.cli.main` is the same command as `align`
