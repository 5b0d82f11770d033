"""One writer per target: an advisory ``fcntl`` lock on a cache entry, run directory or study directory.

The lock is held for the whole time a process writes the target, the "is it fresh?" check included, so two
commands started a moment apart cannot both decide they are first. The kernel drops the lock when its process
dies (kill -9 too), so a stale lock file never blocks a rerun; the file itself stays and only records the holder.
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
    path = folder / LOCK_FILE
    with writing(path):  # a read-only or full disk: one line
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise AlignError(f"{what} {folder} is in use by process {holder}: {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock
