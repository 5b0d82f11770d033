"""One writer per target: an advisory ``fcntl`` lock on a cache entry, run directory or study directory.

The lock is held for the whole time a process writes the target, the "is it fresh?" check included, so two
commands started a moment apart cannot both decide they are first. The kernel drops the lock when its process
dies (kill -9 too), so a stale lock file never blocks a rerun; the file itself stays and only records the holder,
unless its holder deletes the folder with it (``align cache rm``, an ``align embed`` that wrote nothing): whoever
locked the removed file meanwhile notices and locks the new one.
"""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from align.common.errors import AlignError
from align.common.files import require_folder_path, writing

LOCK_FILE = ".lock"


@contextmanager
def exclusive(folder: str | Path, what: str, hint: str = "wait for it to finish, or stop it") -> Iterator[None]:
    """Hold ``folder``'s lock for the block; AlignError naming the holder's PID if another process has it."""
    folder = require_folder_path(folder, what)
    fd = _take(folder, what, hint)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _take(folder: Path, what: str, hint: str) -> int:
    """An open descriptor of ``folder``'s lock file, locked by this process. A lock file that its holder removed
    (``align cache rm`` deletes the folder with it, a refused ``align embed`` its own empty folder) between our
    open and our lock is no lock: the lock is then taken again on the file that is there now."""
    path = folder / LOCK_FILE
    while True:
        with writing(path):  # a read-only or full disk: one line
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise AlignError(f"{what} {folder} is in use by process {holder}: {hint}") from None
        if _is_there(fd, path):
            return fd
        os.close(fd)


def _is_there(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced since it was opened)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev)
