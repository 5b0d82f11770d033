"""What every command shares: user errors and usage errors become one line on stderr and exit code 2; joining
torchrun's group."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:
    from typer._click import exceptions as click_errors  # typer >= 0.24 carries its own copy of click
except ImportError:
    from click import exceptions as click_errors  # type: ignore[no-redef]  # older typer: click itself

from align.common.errors import AlignError, is_out_of_memory, out_of_memory_error, shorten
from align.common.files import WRITE_PROBLEMS, disk_full_error, is_disk_full, is_write_problem, path_text

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
        return AlignError(shorten(f"cannot read or write {path_text(where or 'a file', 120)}: {problem}: {fix}, then "
                                  "run the same command again; finished work is kept"))
    if is_out_of_memory(exc):
        return out_of_memory_error("running this command", exc, "use a smaller model, batch or data set, or free memory")
    if isinstance(exc, UnicodeDecodeError):
        return AlignError(f"a file this command reads is not UTF-8 text ({exc.reason} at byte {exc.start}): save "
                          "configs, metadata and CSV files as UTF-8")
    return None


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line of at most 300 characters (escaped: a path or value with [brackets] is
    text, not rich markup)."""
    err_console.print(f"[bold red]error:[/] {escape(shorten(message))}", highlight=False, soft_wrap=True)


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
            print_error(str(error))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def usage_error_line(exc: Exception, ctx: Any = None) -> str:
    """A usage error of the command line (unknown command, option or value, a missing option) as one line: what is
    wrong, then the usage of the command it concerns and where its help is. ``ctx``: the context of the group that
    was running it, for errors that carry none of their own (an option without its value)."""
    message = exc.format_message().replace(": Value error, ", ": ")  # typer's wording for a value not in a choice
    ctx = getattr(exc, "ctx", None) or _subcommand_context(ctx)
    if ctx is None:
        return message
    usage = " ".join(ctx.get_usage().split()).removeprefix("Usage: ")
    return f"{message} (usage: {usage}; see {ctx.command_path} --help)"


def _subcommand_context(ctx: Any) -> Any:
    """A context for the subcommand ``ctx`` (a group's) was invoking when its options failed to parse; else ``ctx``."""
    name = getattr(ctx, "invoked_subcommand", None)
    command = ctx.command.get_command(ctx, name) if name else None
    return ctx if command is None else command.context_class(command, info_name=name, parent=ctx)


@contextmanager
def _usage_errors_in_one_line(ctx: Any = None) -> Iterator[None]:
    try:
        yield
    except click_errors.UsageError as exc:
        if isinstance(exc, getattr(click_errors, "NoArgsIsHelpError", ())):
            raise  # `align` alone, or a group without its command: the help itself
        print_error(usage_error_line(exc, ctx))
        raise typer.Exit(2) from None


class OneLineUsageErrors(TyperGroup):
    """The ``align`` app's group: a usage error at any level (``align nope``, ``align toy nope``, ``align configs
    nope``, a missing ``--config``) is one ``error:`` line with the command's usage, exit code 2, not typer's box."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line(ctx):  # the command's own options are parsed here
            return super().invoke(ctx)


@contextmanager
def joined(device: str, resume: str) -> Iterator[Any]:
    """Every command's torchrun lifecycle (``align.common.distributed.joined``): the process group joined for the
    block and left after it → this process's Rank (the single-process Rank without torchrun). When a rank dies, the
    others each stop with one line that ends in ``resume``: how the command continues its work."""
    from align.common import distributed  # loads torch: not for --help

    with distributed.joined(device, resume=resume) as me:
        yield me


def rank_log(me: Any) -> Callable[[str], None]:
    """Where a command's messages go: the console on rank 0 (the only rank that reports), nowhere on the others."""
    if me.is_main:
        return lambda message: console.print(message, highlight=False)
    return lambda message: None


# help is rich markup: unescaped, "[track]" would be read as a style tag and vanish from the text
REPORT_HELP = ("Experiment trackers to report to besides metrics.jsonl: tensorboard, wandb, mlflow, "
               "comma-separated, or none (default: the config's report_to). Offline by default; "
               "pip install 'align\\[track]'.")


def report_override(report_to: str | None) -> list[str]:
    """``--report-to LIST`` as the config override it stands for (none when not given)."""
    return [] if report_to is None else [f"report_to={report_to}"]
