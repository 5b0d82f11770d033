"""Small file helpers every edge module shares: atomic writes, the check that an output location can be written,
one line for every write the user's file system refuses, content hashes, strict JSON values."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from align.common.errors import AlignError, shorten

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded: the user's to fix, not a bug
# Every way a write can be refused that the user must fix, not a bug: errno → (what happened, what to do).
WRITE_PROBLEMS = {
    errno.EROFS: ("the file system is read-only", "choose a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you may write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to"),
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space"),
    errno.ENAMETOOLONG: ("a name in the path is too long", "choose a shorter path"),
    errno.ELOOP: ("the path runs through a loop of symbolic links", "fix the link"),
}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (or quota)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def is_write_problem(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal of the file system that the user must fix (``WRITE_PROBLEMS``)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_PROBLEMS


def disk_full_error(path: str | Path) -> AlignError:
    """The one line for a write to ``path`` that ran out of space: where, how much is free, and that a rerun resumes."""
    folder = Path(path).parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2g} GB free"
    except OSError:
        free = "free space unknown"
    return AlignError(shorten(f"no space left on the device writing {shorten(str(path), 160)} ({free}): free some "
                              "space, then run the same command again (align train: add --resume); finished work "
                              "is kept"))


def path_text(path: str | Path, limit: int = 90) -> str:
    """``path`` for a one-line message: whole, or its last ``limit`` characters (the end names the file)."""
    text = " ".join(os.fspath(path).split())
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _at(path: str | Path, exc: OSError) -> str:
    """" (at PATH)": where the file system refused, when that is a folder above ``path`` (not ``path`` itself, nor
    the temporary file of its write beside it)."""
    where = exc.filename
    if where is None or Path(os.fsdecode(where)) == Path(path):
        return ""
    if Path(os.fsdecode(where)).parent == Path(path).parent:
        return ""  # the temporary file of an atomic write: a name the user never sees
    return f" (at {path_text(os.fsdecode(where), 36)})"


def write_error(path: str | Path, exc: OSError) -> AlignError:
    """The one line for a write to ``path`` that the file system refused (``is_write_problem``): where, why, what to
    do, and that a rerun resumes from the finished work."""
    if is_disk_full(exc):
        return disk_full_error(path)
    problem, fix = WRITE_PROBLEMS[exc.errno]
    return AlignError(shorten(f"cannot write {path_text(path, 120)}: {problem}{_at(path, exc)}: {fix}, then run the "
                              "same command again (align train: add --resume); finished work is kept"))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """The block writes ``path``: a refusal of the file system (``is_write_problem``) becomes ``write_error``'s line."""
    try:
        yield
    except OSError as exc:
        if is_write_problem(exc):
            raise write_error(path, exc) from None
        raise


def remove_quietly(path: str | Path) -> None:
    """Remove a temporary file if it is there, whatever the file system says: a clean-up after a failed write must
    never raise a second error over the first (a read-only disk refuses even the unlink of a missing file)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def _check_parents(path: Path, what: str) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise AlignError(f"{what} {path}: {parent} is a file, so no folder can be made inside it")


def require_folder_path(folder: str | Path, what: str) -> Path:
    """``folder`` as a Path, after checking that it and its parents are folders where they exist (AlignError if not)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AlignError(f"{what} {folder} is a file, not a folder: give a folder path")
    _check_parents(folder, what)
    return folder


def require_file_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path, after checking that it is no folder and that its parents are folders where they exist."""
    path = Path(path)
    if path.is_dir():
        raise AlignError(f"{what} {path} is a folder: give a file path (e.g. {path / 'result.json'})")
    _check_parents(path, what)
    return path


def require_writable(path: str | Path, what: str, hint: str, file: bool = False) -> Path:
    """``path`` as a Path, after checking, before any work, that the command can write it: a folder it will fill
    (or with ``file``, a file it will write atomically beside its siblings). The path must be a folder (a file)
    or not exist yet, every folder above it that exists a folder, its names short enough, and the deepest folder
    that exists must take a new file: an anonymous temporary file is made there and dropped, so the check
    creates nothing that stays (no folder either). AlignError, one line naming the path, what the file system
    said and ``hint`` (how to give the command another location)."""
    try:
        path = require_file_path(path, what) if file else require_folder_path(path, what)
        folder = _deepest_folder(path.parent if file else path, what)
        _check_name_lengths(path, folder)
        _probe(folder)
    except OSError as exc:
        if not is_write_problem(exc):
            raise
        problem, fix = WRITE_PROBLEMS[exc.errno]
        raise AlignError(shorten(f"cannot write the {what} {path_text(path)}: {problem}{_at(path, exc)}: {fix} "
                                 f"({hint}); nothing was written")) from None
    return path


def _probe(folder: Path) -> None:
    """Make an anonymous file in ``folder`` and drop it (O_TMPFILE where the system has it: never visible, nothing
    to clean up; else a temporary name removed at once); OSError naming ``folder`` if the system refuses."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(folder)) from None


def _deepest_folder(folder: Path, what: str) -> Path:
    """The deepest of ``folder`` and the folders above it that exists (OSError from the system on a link loop, a
    name too long or a folder it may not search)."""
    while True:
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            if folder == folder.parent:
                raise
            folder = folder.parent
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise AlignError(f"{what}: {folder} is a file, so no folder can be made inside it")
        return folder


def _check_name_lengths(path: Path, folder: Path) -> None:
    """OSError(ENAMETOOLONG) when a name of ``path`` is longer than the file system of ``folder`` (where it will be
    made) allows, or the whole path is: below a folder that does not exist yet the system says "no such file"."""
    try:
        name_max, path_max = os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096  # Linux's limits
    if any(len(os.fsencode(part)) > name_max for part in path.parts) or len(os.fsencode(path.absolute())) >= path_max:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fspath(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    A failed write removes its temporary file; a refusal of the file system (no space, read-only, no permission,
    ...) is ``write_error``'s one line naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            remove_quietly(tmp)
        if is_write_problem(exc):
            raise write_error(path, exc) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (never memoised: verification relies on it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON values: non-finite floats → None, tuples → lists, tensors → numbers or lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "ndim"):  # torch tensors and numpy arrays, without importing them
        return json_safe(obj.item() if obj.ndim == 0 else obj.tolist())
    return obj


def wait_until_visible(paths: list[Path], what: str, timeout_s: float = 180.0, poll_s: float = 0.5) -> None:
    """Wait until every file of ``paths`` exists here: files other ranks have just written to a shared file system
    (an NFS client keeps "no such file" answers for up to a minute; listing the folder again makes it ask the
    server). AlignError after ``timeout_s`` naming the first file still missing: the folder is not shared."""
    deadline = time.monotonic() + timeout_s
    missing = [Path(p) for p in paths]
    while True:
        missing = [p for p in missing if not p.exists()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise AlignError(shorten(f"{len(missing)} {what} written by other ranks not visible here after "
                                     f"{timeout_s:g} s (first: {shorten(str(missing[0]), 120)}): every rank must "
                                     "see one file system (a shared one across nodes)"))
        time.sleep(poll_s)
        for folder in {p.parent for p in missing}:
            try:
                os.listdir(folder)
            except OSError:
                pass


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON (``json_safe`` first; NaN and inf refused): what every JSON file of align holds."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as an indented JSON file, written atomically."""
    atomic_write_text(path, json_text(obj) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; AlignError (one line) if it is missing, unreadable, not UTF-8 or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AlignError(f"{path} not found") from None
    except UnicodeDecodeError as exc:
        raise AlignError(f"{path} is not UTF-8 text (byte {exc.start}); the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise AlignError(f"{path} is not valid JSON ({exc.msg}); the file is damaged") from None
    except OSError as exc:
        raise AlignError(f"cannot read {path}: {exc.strerror}") from None
