"""Shared pieces of the fault-injection tests (test_faults_*.py): comparing a resumed result with an uninterrupted
one, and a simulated full disk."""
from __future__ import annotations

import builtins
import errno
import fnmatch
import json
import os
import re
from pathlib import Path

import yaml


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative paths), lock files aside (they only record the last holder's PID)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def without(obj, *keys):
    """``obj`` (nested dicts) without the given keys at any depth: the wall-clock times of a run."""
    if isinstance(obj, dict):
        return {k: without(v, *keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [without(v, *keys) for v in obj]
    return obj


def assert_same_run(ref: Path, got: Path, final_step: int) -> None:
    """Two run directories hold the same run: the same files, byte-identical weights (final, best and the kept
    checkpoints: head, optimizer state, RNG), the same metrics log, and the same JSON apart from wall times."""
    assert files_under(got) == files_under(ref)
    tensor_files = [p for p in files_under(ref) if p.endswith(".safetensors")]
    assert f"checkpoints/step-{final_step:07d}.safetensors" in tensor_files and "checkpoints/best.safetensors" in tensor_files
    for name in tensor_files + ["metrics.jsonl", "checkpoints/best.json"]:
        assert same_bytes(ref / name, got / name), name
    for name in [p for p in files_under(ref) if p.endswith(".json")]:
        a, b = (json.loads((d / name).read_text()) for d in (ref, got))
        assert without(a, "wall_time_s") == without(b, "wall_time_s"), name
    a, b = (yaml.safe_load((d / "config.yaml").read_text()) for d in (ref, got))
    assert without(a, "out_dir") == without(b, "out_dir")



def one_error_line(result, after_progress: bool = False) -> str:
    """The single ``error:`` line of a CLI result that must have failed as a user error (exit 2, no traceback):
    the whole output, or with ``after_progress`` its last line after progress messages."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert (len(lines) == 1 or after_progress) and lines[-1].startswith("error:"), result.output
    assert sum(line.startswith("error:") for line in lines) == 1, result.output
    assert "Traceback" not in result.output and len(lines[-1]) <= len("error: ") + 300, lines[-1]
    return lines[-1]


def temp_files(folder: Path) -> list[str]:
    """Temporary files of atomic writes and plot saves below ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".tmp.png")))


class FullDisk:
    """A full disk, simulated without root: the ``nth`` file opened for writing under ``root`` whose name matches
    ``pattern`` gets half of its first write, then ENOSPC; from then on every write under ``root`` fails.

    It wraps what our code writes through: ``open`` (metrics appends, matplotlib, numpy) and ``os.fdopen`` (the
    atomic writes of ``align.files``). Install it with a pytest ``monkeypatch`` (or a ``monkeypatch.context()``).
    """

    def __init__(self, monkeypatch, root: Path, pattern: str, nth: int = 1) -> None:
        self.root, self.pattern, self.nth = str(root), pattern, nth
        self.seen, self.full, self.failed = 0, False, []
        real_open, real_fdopen = builtins.open, os.fdopen

        def fake_open(file, mode="r", *args, **kwargs):
            return self._wrap(real_open(file, mode, *args, **kwargs), file, mode)

        def fake_fdopen(fd, mode="r", *args, **kwargs):
            return self._wrap(real_fdopen(fd, mode, *args, **kwargs), os.readlink(f"/proc/self/fd/{fd}"), mode)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "fdopen", fake_fdopen)

    def _wrap(self, fh, name, mode: str):
        if not isinstance(name, (str, os.PathLike)) or not any(c in mode for c in "wax+"):
            return fh
        path = os.path.abspath(os.fspath(name))
        if not path.startswith(self.root + os.sep):
            return fh
        if not self.full and fnmatch.fnmatch(os.path.basename(path), self.pattern):
            self.seen += 1
            if self.seen == self.nth:
                self.full = True
                self.failed.append(path)
                return _FailingFile(fh, partial=True)
        return _FailingFile(fh, partial=False) if self.full else fh


class _FailingFile:
    """A file on a full disk: the first write lands half its bytes (``partial``), then every write fails."""

    def __init__(self, fh, partial: bool) -> None:
        self._fh, self._partial = fh, partial

    def write(self, data):
        if self._partial:
            self._partial = False
            self._fh.write(data[:len(data) // 2])
            self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        try:
            self._fh.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getattr__(self, name):
        return getattr(self._fh, name)


class RefusingDisk:
    """A file system that refuses every change below ``root`` with OSError(``code``): EROFS for a read-only mount,
    EACCES or EPERM for a folder without permission, ENOSPC or EDQUOT, ENAMETOOLONG, ELOOP. Simulated (we may run
    as root, whom permission bits do not stop): the low-level calls that create, change or remove files raise —
    ``os.open`` with a write flag (temporary files, locks, ``tempfile``), ``open`` for writing, ``os.mkdir``,
    ``os.unlink``/``os.remove``, ``os.rename``/``os.replace`` and ``os.rmdir``. Reads still work.

    With ``pattern`` the disk works until the first change of a file whose name matches it (a write that fails in
    the middle of a run), then refuses everything below ``root``; without, from the start. ``refused`` lists the
    paths it refused. Install it with a pytest ``monkeypatch`` (or a ``monkeypatch.context()``)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC | getattr(os, "O_TMPFILE", 0)

    def __init__(self, monkeypatch, root: Path, code: int, pattern: str | None = None) -> None:
        self.root, self.code, self.pattern = os.path.abspath(root), code, pattern
        self.refusing, self.refused = pattern is None, []
        real = {name: getattr(os, name) for name in ("open", "mkdir", "unlink", "remove", "rename", "replace", "rmdir")}
        real_open = builtins.open

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                self._check(path)
            return real["open"](path, flags, *args, **kwargs)

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                self._check(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded(name):
            def call(path, *args, **kwargs):
                self._check(path)
                return real[name](path, *args, **kwargs)
            return call

        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        for name in ("mkdir", "unlink", "remove", "rename", "replace", "rmdir"):
            monkeypatch.setattr(os, name, guarded(name))

    def _check(self, path) -> None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return  # a file descriptor
        path = os.path.abspath(os.fsdecode(path))
        if path != self.root and not path.startswith(self.root + os.sep):
            return
        if not self.refusing and fnmatch.fnmatch(os.path.basename(path), self.pattern):
            self.refusing = True
        if self.refusing:
            self.refused.append(path)
            raise OSError(self.code, os.strerror(self.code), path)


def assert_one_line_per_survivor(stderr: str, survivors: list[int], world: int, resume: str) -> None:
    """torchrun's stderr after a rank of the job was killed: each rank still alive said one ``error:`` line (who,
    what happened, ``resume``), and align printed no traceback (torchrun's own summary and its launcher's traceback
    may follow; an align traceback would carry torch's "[rankN]:" prefix or name a file of align)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert sorted(int(line.split()[2]) for line in lines) == sorted(survivors), stderr[-3000:]
    for line in lines:
        assert line.startswith("error: rank ") and f" of {world} " in line and line.endswith(resume), line
        assert "lost another rank of the job" in line or "was stopped by SIGTERM" in line, line
    assert not re.search(r"^\[rank\d+\]:", stderr, re.M), stderr[-3000:]
    assert not re.search(r'File "[^"]*/(align|cli)/', stderr), stderr[-3000:]
