"""What every command shares: user errors become one line on stderr and exit code 2; joining torchrun's group."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from align.common.errors import AlignError, is_out_of_memory, out_of_memory_error, shorten
from align.common.files import WRITE_PROBLEMS, disk_full_error, is_disk_full, is_write_problem

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def environment_error(exc: BaseException) -> AlignError | None:
    """The last line of defence for failures the user's machine or files cause, which the library did not turn
    into an AlignError where they happened: no space left, a read-only file system, no permission, a name too long,
    a link loop (``align.common.files.WRITE_PROBLEMS``), out of memory, a file that is not UTF-8. None for anything
    else (a real bug keeps its traceback)."""
    where = getattr(exc, "filename", None)
    if is_disk_full(exc):
        return disk_full_error(where) if where else AlignError(
            "no space left on the device: free some space, then run the same command again; finished work is kept")
    if is_write_problem(exc):  # where the library did not say it: the file may have been read or written
        problem, fix = WRITE_PROBLEMS[exc.errno]
        return AlignError(shorten(f"cannot read or write {shorten(str(where or 'a file'), 160)}: {problem}: {fix}, "
                                  "then run the same command again; finished work is kept"))
    if is_out_of_memory(exc):
        return out_of_memory_error("running this command", exc, "use a smaller model, batch or data set, or free memory")
    if isinstance(exc, UnicodeDecodeError):
        return AlignError(f"a file this command reads is not UTF-8 text ({exc.reason} at byte {exc.start}): save "
                          "configs, metadata and CSV files as UTF-8")
    return None


def user_errors(func: F) -> F:
    """Wrap a command: an AlignError (or Ctrl-C, or a failure of ``environment_error``'s kinds) is printed as one
    line of at most 300 characters, never as a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted: finished work is saved; run the same command again to resume")
            raise typer.Exit(130) from None
        except Exception as exc:
            error = exc if isinstance(exc, AlignError) else environment_error(exc)
            if error is None:
                raise
            # escaped: a path or value with [brackets] is text, not rich markup
            err_console.print(f"[bold red]error:[/] {escape(shorten(str(error)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def joined(device: str) -> Iterator[Any]:
    """Every command's torchrun lifecycle (``align.common.distributed.joined``): the process group joined for the
    block and left after it → this process's Rank (the single-process Rank without torchrun)."""
    from align.common import distributed  # loads torch: not for --help

    with distributed.joined(device) as me:
        yield me


def rank_log(me: Any) -> Callable[[str], None]:
    """Where a command's messages go: the console on rank 0 (the only rank that reports), nowhere on the others."""
    if me.is_main:
        return lambda message: console.print(message, highlight=False)
    return lambda message: None
