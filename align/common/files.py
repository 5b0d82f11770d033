"""Small file helpers every edge module shares: atomic writes, content hashes, strict JSON values."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from align.common.errors import AlignError, shorten

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded: the user's to fix, not a bug


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (or quota)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    A failed write removes its temporary file; running out of space is an AlignError naming ``path``.
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
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
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
