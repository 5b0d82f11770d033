"""The cache root as a collection (edge layer): list its entries, find one by key or prefix, verify, remove.

A folder counts as a cache only when ``align embed`` (or ``align cache import``) provably wrote it: a manifest
naming the folder (``is_own_manifest``) or a ``work/`` holding the shard plan of its key (``is_own_plan``), and
nothing an embed never writes. A folder holding only a lock, an empty ``work/`` or someone else's
``manifest.json`` is none, so ``align cache rm`` cannot delete a folder of another kind, and keys match only real
caches. ``align cache ls`` also shows, as damaged, a folder named like a key whose manifest cannot be read (rm
leaves it: it is deleted by hand).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from align.cache.key import ARRAYS, KEY_NAME, LABEL_ARRAYS, MANIFEST, VERIFIED, WORK
from align.cache.read import check_cache, is_complete, is_own_manifest, read_manifest
from align.cache.work import PLAN, is_own_plan
from align.common import paths
from align.common.config import shorten
from align.common.errors import AlignError
from align.common.locks import LOCK_FILE, exclusive

TOP_NAMES = set(ARRAYS) | set(LABEL_ARRAYS) | {MANIFEST, VERIFIED, WORK, LOCK_FILE}
WORK_NAME = re.compile(r"plan\.json|(image|text)-\d{5}\.(npy|json)|classes\.(npy|json)")
TEMP_NAME = re.compile(r"\..+\.tmp")  # align.cache.work.save_array's and atomic_write_text's temporary files


def _foreign_names(path: Path) -> list[str]:
    """Entries of a folder (and of its work/) that ``align embed`` never writes."""
    odd = [p.name for p in path.iterdir() if p.name not in TOP_NAMES and not TEMP_NAME.fullmatch(p.name)]
    work = path / WORK
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        odd.append(WORK)
    elif work.is_dir():
        odd += [f"{WORK}/{p.name}" for p in work.iterdir()
                if not (WORK_NAME.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name)) or p.is_dir()]
    return sorted(odd)


def _not_a_cache(path: Path) -> str | None:
    """Why ``path`` is not a cache folder (a short phrase), or None when it is one."""
    try:
        if not path.is_dir() or path.is_symlink():
            return "it is not a folder"
        odd = _foreign_names(path)
        if odd:
            return f"it holds {shorten(', '.join(odd[:3]), 80)}, which `align embed` never writes"
        if is_own_manifest(path) or is_own_plan(path / WORK, path.name):
            return None
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if (path / MANIFEST).exists():
        return f"its {MANIFEST} is not the manifest `align embed` writes for a cache of that name"
    if (path / WORK / PLAN).exists():
        return f"its {WORK}/{PLAN} is not the shard plan `align embed` writes for a cache of that name"
    return f"no {MANIFEST} and no {WORK}/{PLAN}: no embed wrote it"


def _is_cache_folder(path: Path) -> bool:
    """A finished cache, a damaged one whose manifest still names it, or an embed in progress (its shard plan)."""
    return _not_a_cache(path) is None


def _is_unreadable_cache(path: Path) -> bool:
    """A folder named like a cache key, holding nothing an embed never writes, whose manifest.json is not JSON
    (torn, bit rot): shown by ``align cache ls`` as damaged, though ``align cache rm`` leaves it (nothing proves
    it is a cache)."""
    try:
        if KEY_NAME.fullmatch(path.name) is None or path.is_symlink() or _foreign_names(path):
            return False
        json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8 or not JSON
        return True
    except OSError:
        return False
    return False


def list_caches(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per cache folder under ``root`` (default <data root>/cache): key, path, bytes, status, counts, ..."""
    root = paths.cache_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    out = []
    shown = (p for p in root.iterdir()
             if not p.name.startswith(".") and (_is_cache_folder(p) or _is_unreadable_cache(p)))
    for path in sorted(shown):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        manifest = read_manifest(path)
        status = "ok" if is_complete(path) else "damaged" if (path / MANIFEST).exists() else "incomplete"
        entry: dict[str, Any] = {"key": path.name, "path": str(path), "bytes": size, "status": status}
        if manifest is not None:
            entry.update(split=manifest["split"], dataset=str(manifest["dataset"].get("name")),
                         images=manifest["counts"]["images"], captions=manifest["counts"]["captions"],
                         skipped=manifest["counts"]["skipped_images"],
                         image_encoder=str(manifest["encoders"].get("image")),
                         text_encoder=str(manifest["encoders"].get("text")), dtype=manifest["storage_dtype"],
                         dims=manifest["dims"], created=manifest.get("created"))
        out.append(entry)
    return out


def resolve_cache(root: str | Path | None, key: str) -> Path:
    """The folder of cache ``key`` (or of the one cache whose key starts with it) under ``root`` (None: default)."""
    root = paths.cache_dir() if root is None else Path(root)
    if not key or "/" in key or key in (".", ".."):
        raise AlignError(f"{shorten(repr(key), 80)} is not a cache key: see `align cache ls --root "
                         f"{shlex.quote(str(root))}`")
    if (root / key).is_dir():
        return root / key
    matches = [p for p in root.iterdir() if p.name.startswith(key) and _is_cache_folder(p)] if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AlignError(f"no cache {shorten(repr(key), 80)} under {root}: see `align cache ls --root "
                         f"{shlex.quote(str(root))}`")
    raise AlignError(f"{key!r} matches {len(matches)} caches under {root} ({', '.join(p.name for p in matches[:4])}): "
                     f"give more of the key")


def find_cache(key_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A cache folder given as its path, or as its key (a unique prefix will do) under ``root`` (default root)."""
    path = Path(key_or_path)
    return path if path.is_dir() else resolve_cache(root, str(key_or_path))


def verify_cache(path: str | Path) -> list[str]:
    """The problem found by re-reading and re-hashing every file of a cache folder, as a list; [] when sound."""
    path = Path(path)
    try:
        check_cache(path, rehash=True)
    except AlignError as exc:
        return [str(exc)]
    return []


def remove_cache(root: str | Path, key: str) -> Path:
    """Delete cache ``key`` (or the one key starting with it) under ``root``; returns the removed folder.

    Only a real cache is removed (see the module docstring): given by its exact key, or by a prefix that only one
    cache's key starts with. An ``align embed`` still writing it (its lock held) is refused with its PID."""
    path = resolve_cache(root, key)
    if path.is_symlink() or path.resolve().parent != Path(root).resolve():
        raise AlignError(f"{path} is not directly under {root}: refusing to delete it")
    why = _not_a_cache(path)
    if why is not None:
        raise AlignError(f"{path} is not an embedding cache ({why}): refusing to delete it")
    with exclusive(path, "cache", "an `align embed` is writing it; wait for it to finish or stop it"):
        shutil.rmtree(path)
    return path
