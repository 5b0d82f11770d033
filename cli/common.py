"""What every command shares: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from align.errors import AlignError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Wrap a command: an AlignError (or Ctrl-C) is printed as one line, never as a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AlignError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished work is saved; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
