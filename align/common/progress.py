"""How long loops report: one progress-bar style (drawn with rich) and the ``Log`` type of a message sink."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

Log = Callable[[str], None]  # where a long job reports one-line messages (the CLI prints them; tests collect them)


class Bar:
    """A handle on one task of a rich progress display."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set(self, completed: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def progress_bar(total: float | None, description: str, enabled: bool = True) -> Iterator[Bar]:
    """``with progress_bar(n, "embedding images") as bar: ... bar.advance(k)``; a no-op when disabled."""
    if not enabled:
        yield Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    with progress:
        yield Bar(progress, progress.add_task(description, total=total))
