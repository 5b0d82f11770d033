"""Where align keeps its files unless told otherwise: one data root ($ALIGN_HOME, else ./data) and its folders.

Read at call time, so setting ALIGN_HOME moves every default; explicit options (--root, --cache-root, --out, a
config's cache_root or out_dir) still win. A run's or study's folder named in a config (``out_dir``, ``study_dir``)
lives under the data root when relative (``in_data_root``), never under whatever folder a later command runs in;
and a run's or study's own config.yaml names its folder by where it sits (``saved_config_folder``). No heavy
imports: the CLI reads these to build its defaults.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "ALIGN_HOME"
SAVED_CONFIG = "config.yaml"  # the resolved config a run or study folder keeps


def data_root() -> Path:
    """``$ALIGN_HOME`` when set and not empty, else ``data`` relative to the working directory."""
    home = os.environ.get(ENV, "").strip()
    return Path(home).expanduser() if home else Path("data")


def cache_dir() -> Path:
    """Default cache root of ``align embed``: <data root>/cache."""
    return data_root() / "cache"


def runs_dir() -> Path:
    """Default parent of training run directories: <data root>/runs."""
    return data_root() / "runs"


def studies_dir() -> Path:
    """Default parent of ``align compare`` study folders: <data root>/studies."""
    return data_root() / "studies"


def toy_dir() -> Path:
    """Default output folder of ``align toy``: <data root>/toy."""
    return data_root() / "toy"


def mlflow_dir() -> Path:
    """Default local MLflow store of ``--report-to mlflow`` (a ``file:`` store): <data root>/mlruns."""
    return data_root() / "mlruns"


def in_data_root(location: str | Path) -> Path:
    """A folder named in a config, as an absolute path: ``~`` expanded, and a relative one taken under the data root
    (``runs/x`` → <data root>/runs/x), so a config file means the same folder from every working folder."""
    path = Path(location).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else data_root() / path))


def relative_to_data_root(path: str | Path) -> str:
    """How a config names the folder ``path`` (``in_data_root`` reads it back): relative to the data root when it
    lies inside it (so moving $ALIGN_HOME moves it along), else absolute."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    try:
        return path.relative_to(os.path.abspath(data_root())).as_posix()
    except ValueError:
        return str(path)


def saved_config_folder(config_path: str | Path, marks: tuple[str, ...]) -> Path | None:
    """The folder (absolute) of a run's or a study's own config.yaml: a file named config.yaml beside at least one of
    ``marks``, the files only such a folder holds (a run's checkpoints/, a study's packs.json, its lock, ...);
    None for any other config file. A copied or moved folder is found where it is now."""
    path = Path(config_path)
    folder = path.parent
    try:
        return Path(os.path.abspath(folder)) if path.name == SAVED_CONFIG and any(
            (folder / mark).exists() for mark in marks) else None
    except OSError:
        return None
