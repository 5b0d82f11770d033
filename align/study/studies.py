"""The study folder (edge layer): where it lives, its config.yaml, its pack layout (``packs.json``) and the
temporary files a killed run leaves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from align.common.errors import AlignError
from align.train import runs


def study_dir(cfg: Any) -> Path:
    """The study's folder: ``study_dir`` if set, else ``<data root>/studies/<name>``."""
    from align.common.paths import studies_dir

    return Path(cfg.study_dir) if cfg.study_dir else studies_dir() / cfg.name


def clear_temp_files(root: Path) -> list[Path]:
    """Remove the temporary files a killed study left in its folder (tables, report, plots); returns them.
    Only call it holding the study's lock: then no other process is writing them."""
    stale = [p for pattern in (".*.tmp", ".*.tmp.png") for p in Path(root).glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


PACKS_FILE = "packs.json"  # the study's pack layout and threads per pack, fixed at its first run


def read_pack_layout(root: Path) -> dict[str, Any] | None:
    """ROOT/packs.json as {"threads": int, "packs": [[cell key, ...], ...]}, or None when there is none;
    AlignError (one line) when it is damaged."""
    path = Path(root) / PACKS_FILE
    if not path.is_file():
        return None
    layout = runs.read_json(path)
    ok = isinstance(layout, dict) and isinstance(layout.get("threads"), int) and layout["threads"] >= 1 \
        and isinstance(layout.get("packs"), list) \
        and all(isinstance(p, list) and p and all(isinstance(k, str) for k in p) for p in layout["packs"])
    keys = [k for p in layout["packs"] for k in p] if ok else []
    if not ok or len(keys) != len(set(keys)):
        raise AlignError(f"{path} is damaged (not a pack layout): delete it to plan the packs again (resumed cells "
                         "may then differ from an uninterrupted run in the last bits)")
    return layout


def write_pack_layout(root: Path, layout: dict[str, Any]) -> None:
    """Write ROOT/packs.json (atomically)."""
    runs.write_json(Path(root) / PACKS_FILE, layout)


def write_study_config(root: Path, cfg: Any) -> Path:
    """The study's resolved config (an ``align.compare.CompareConfig``) as ROOT/config.yaml, headed by its command."""
    from align.common.config import dump_config

    path = Path(root) / "config.yaml"
    runs.atomic_write_text(path, f"# align compare --config {path}\n" + dump_config(cfg))
    return path
