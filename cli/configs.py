"""`align configs`: the YAML configs shipped inside the package, usable as `--config NAME`."""
from __future__ import annotations

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from align.cli.common import console, user_errors
from align.common.config_files import configs_root, list_configs


@user_errors
def configs_command() -> None:
    """List the packaged configs (kind, name, what each is for); pass NAME or KIND/NAME to --config."""
    table = Table(title=f"packaged configs in {configs_root()}", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD)
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("about", ratio=1)
    for config in list_configs():
        # one row per config: the description is cut to the terminal (the file's header has the rest)
        table.add_row(config.kind, config.name, Text(config.summary, no_wrap=True, overflow="ellipsis"))
    console.print(table)
    console.print("use: align compare --config default, align embed --config synthetic_offline, "
                  "or KIND/NAME (e.g. compare/default); datasets/ files are `dataset:` sections to copy",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add `align configs`."""
    app.command("configs")(configs_command)
