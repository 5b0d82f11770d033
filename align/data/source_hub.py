"""Hub image–caption sources (edge layer): ``datasets.load_dataset`` by hub id, or a local data folder.

``datasets.load_dataset(name, config_name, split=..., revision=..., streaming=...)``, or a local folder written by
``save_to_disk`` (or any local data folder ``load_dataset`` reads). Columns are mapped by ``image_column`` /
``caption_column`` (a text column, optionally split by ``caption_separator``, or a list of texts);
``split_column`` + ``split_values`` keep the rows of one split (e.g. Karpathy ``split == "test"``). Offline, or
with the hub out of reach (``align.data.hub``), only the local cache is used and a miss is one AlignError line.
Images stay encoded until ``load_image`` decodes one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from align.common.errors import AlignError
from align.data import hub
from align.data.caption_set import ImageCaptionSet, ImageUnreadable, Selection, open_image
from align.data.source_columns import CAPTION_COLUMN_GUESSES, IMAGE_COLUMN_GUESSES, Columns, pick_column, \
    split_captions
from align.data.source_local import stat_fingerprint


@dataclass(frozen=True)
class HubSource:
    """A ``hub`` source: which hub set (or saved folder), which split of it, how its columns map, what to keep."""

    name: str  # hub id, or a local folder written by save_to_disk
    columns: Columns
    selection: Selection
    config_name: str | None = None
    hf_split: str | dict[str, str] | None = None  # hub split to read: one name, or {our split: hub split}
    revision: str | None = None  # pin a hub commit so the data cannot change under a cache
    id_column: str | None = None  # column giving stable image ids (default: the row number)
    streaming: bool = False  # iterate instead of downloading the split (same rows, same order)

    def load(self, split: str) -> ImageCaptionSet:
        """The rows of ``split`` (up to max_images, read in order); images decoded on demand."""
        ds, image_col, caption_col = self._mapped_columns(self._dataset(split))
        accepted = self.columns.split_filter(split)
        read = self._read_stream if not hasattr(ds, "__len__") else self._read_table
        ids, caption_lists, loader = read(ds, image_col, caption_col, accepted)
        if not ids:
            raise AlignError(f"{self._where}: no rows for split {split!r}"
                             + (f" (no {self.columns.split_column} value in {sorted(accepted)})" if accepted else ""))
        meta = {"source": self.name, "split": split, "hf_split": self.hub_split(split),
                "streaming": bool(self.streaming)}
        return self.selection.apply(f"{Path(self.name).name}/{split}", ids, caption_lists, loader, meta)

    def identity(self, split: str) -> dict[str, Any]:
        """Name (or, for a local folder, the stat fingerprint of its files), config, split, revision and column
        mapping. ``streaming`` is left out: it yields the same rows in the same order."""
        out: dict[str, Any] = {"config_name": self.config_name, "hf_split": self.hub_split(split),
                               "revision": self.revision, "id_column": self.id_column,
                               **self.columns.identity(split)}
        if _is_local_folder(self.name):
            root = Path(self.name).expanduser()
            files = sorted(p for p in root.rglob("*") if p.is_file())
            out["local_folder_sha256"] = stat_fingerprint(files, root)
        else:
            out["name"] = self.name
        return out

    def hub_split(self, split: str) -> str:
        """The hub split read for our ``split`` (hf_split maps it; default: the same name)."""
        if isinstance(self.hf_split, dict):
            if split not in self.hf_split:
                raise AlignError(f"hf_split has no entry for split {split!r}; it maps: "
                                 f"{', '.join(f'{k}->{v}' for k, v in self.hf_split.items())}")
            return self.hf_split[split]
        return self.hf_split or split

    @property
    def _where(self) -> str:
        return f"hub dataset {self.name}"

    @property
    def _base(self) -> Path | None:
        """Where relative image paths in a local folder's rows point."""
        return Path(self.name).expanduser() if _is_local_folder(self.name) else None

    def _dataset(self, split: str) -> Any:
        """The ``datasets`` Dataset / IterableDataset of the requested hub split (only local data when offline)."""
        import datasets  # heavy: only when a hub source is read

        hf_split = self.hub_split(split)
        local = Path(self.name).expanduser()
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            try:
                ds = datasets.load_from_disk(str(local))
            except Exception as exc:  # datasets raises several types for a damaged folder
                raise AlignError(f"cannot read the saved dataset in {local}: {str(exc).splitlines()[0]}") from None
            if isinstance(ds, datasets.DatasetDict):
                if hf_split not in ds:
                    raise AlignError(f"{local} has no split {hf_split!r}; it has: {', '.join(ds)} (set hf_split)")
                ds = ds[hf_split]
            return ds.to_iterable_dataset() if self.streaming else ds

        is_local = local.is_dir()
        local_only = not is_local and hub.local_only()
        why = hub.offline_reason()
        if local_only and self.streaming:
            raise AlignError(f"streaming hub dataset {self.name!r} needs network and {why}: set streaming: false to "
                             f"use a locally cached copy, or pass a local folder (save_to_disk) as name")
        try:
            with (_ForcedOffline() if local_only else contextlib.nullcontext()):
                return datasets.load_dataset(str(local) if is_local else self.name, self.config_name, split=hf_split,
                                             revision=self.revision, streaming=self.streaming)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
            if local_only:
                raise AlignError(f"hub dataset {self.name!r} is not in the local cache and {why}: pass a local "
                                 f"folder (name: a save_to_disk folder, or kind: imagefolder / csv), or run once with "
                                 f"network to cache it") from None
            raise AlignError(f"cannot load hub dataset {self.name!r}: {str(exc).splitlines()[0]} (check name, "
                             f"config_name and access)") from None
        except ValueError as exc:  # unknown split or config
            raise AlignError(f"hub dataset {self.name!r}: {str(exc).splitlines()[0]} (set hf_split / config_name)") \
                from None

    def _mapped_columns(self, ds: Any) -> tuple[Any, str, str]:
        """(dataset with its image column left undecoded, image column, caption column); the split and id
        columns checked."""
        from datasets import Image as ImageFeature  # heavy: only when a hub source is read

        features = ds.features
        if features is None:  # some streamed sets only know their columns after reading a first row
            ds = ds._resolve_features()  # noqa: SLF001 - public API has no other way to ask
            features = ds.features
        names = list(features or {})
        image_cols = [k for k, v in (features or {}).items() if isinstance(v, ImageFeature)]
        cols, where = self.columns, self._where
        image_col = pick_column(names, cols.image_column, tuple(image_cols) + IMAGE_COLUMN_GUESSES, "image", where)
        caption_col = pick_column(names, cols.caption_column, CAPTION_COLUMN_GUESSES, "caption", where)
        if cols.split_column is not None and cols.split_column not in names:
            raise AlignError(f"{where}: no split column {cols.split_column!r}; columns are: {', '.join(names)}")
        if self.id_column is not None and self.id_column not in names:
            raise AlignError(f"{where}: no id column {self.id_column!r}; columns are: {', '.join(names)}")
        if image_col in image_cols:
            ds = ds.cast_column(image_col, ImageFeature(decode=False))  # decode per item, in load_image
        return ds, image_col, caption_col

    def _text_columns(self, caption_col: str) -> list[str]:
        return [c for c in (caption_col, self.columns.split_column, self.id_column) if c is not None]

    def _read_stream(self, ds: Any, image_col: str, caption_col: str, accepted: set[str] | None) \
            -> tuple[list[str], list[list[str]], Any]:
        """Iterate a streamed split, keeping each kept row's encoded image cell in memory."""
        ids: list[str] = []
        caption_lists: list[list[str]] = []
        cells: list[Any] = []
        limit, split_column = self.selection.max_images, self.columns.split_column
        stream = ds.select_columns(list(dict.fromkeys(self._text_columns(caption_col) + [image_col])))
        for r, row in enumerate(stream):
            if accepted is not None and str(row[split_column]) not in accepted:
                continue
            ids.append(str(row[self.id_column]) if self.id_column else str(r))
            caption_lists.append(split_captions(row[caption_col], self.columns.caption_separator,
                                                f"{self._where} row {r}"))
            cells.append(row[image_col])
            if limit is not None and len(ids) >= limit:
                break
        return ids, caption_lists, _MemoryImages(cells, ids, self._base)

    def _read_table(self, ds: Any, image_col: str, caption_col: str, accepted: set[str] | None) \
            -> tuple[list[str], list[list[str]], Any]:
        """Read the text columns of a (memory-mapped) split; images stay in the dataset, read per item."""
        ids: list[str] = []
        caption_lists: list[list[str]] = []
        rows: list[int] = []
        limit, split_column = self.selection.max_images, self.columns.split_column
        table = ds.select_columns(list(dict.fromkeys(self._text_columns(caption_col)))).to_dict()
        for r in range(len(ds)):
            if accepted is not None and str(table[split_column][r]) not in accepted:
                continue
            ids.append(str(table[self.id_column][r]) if self.id_column else str(r))
            caption_lists.append(split_captions(table[caption_col][r], self.columns.caption_separator,
                                                f"{self._where} row {r}"))
            rows.append(r)
            if limit is not None and len(ids) >= limit:
                break
        return ids, caption_lists, _HubImages(ds.select_columns([image_col]), image_col, rows, ids, self._base)


class _HubImages:
    """Picklable loader of one image column of a (memory-mapped) ``datasets.Dataset``; decodes per item."""

    def __init__(self, ds: Any, column: str, rows: list[int], ids: list[str], base: Path | None) -> None:
        self.ds, self.column, self.rows, self.ids, self.base = ds, column, rows, ids, base

    def __call__(self, i: int) -> Image.Image:
        try:
            value = self.ds[self.rows[i]][self.column]
        except Exception as exc:  # an arrow read error on a damaged row
            raise ImageUnreadable(f"image {self.ids[i]}: cannot read row ({type(exc).__name__}: {exc})") from None
        return _decode_cell(value, self.ids[i], self.base)


class _MemoryImages:
    """Loader over encoded image cells kept from a streamed split (bytes, not decoded pixels)."""

    def __init__(self, cells: list[Any], ids: list[str], base: Path | None) -> None:
        self.cells, self.ids, self.base = cells, ids, base

    def __call__(self, i: int) -> Image.Image:
        return _decode_cell(self.cells[i], self.ids[i], self.base)


def _decode_cell(value: Any, image_id: str, base: Path | None) -> Image.Image:
    """An undecoded image cell ({bytes, path}, raw bytes, a path, or a PIL image) → RGB image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return open_image(value["bytes"], image_id)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return open_image(bytes(value), image_id)
    if isinstance(value, str) and value:
        path = Path(value)
        return open_image(path if path.is_absolute() or base is None else base / path, image_id)
    raise ImageUnreadable(f"image {image_id}: no image data in this row")


class _ForcedOffline:
    """Temporarily force offline mode in ``datasets`` and ``huggingface_hub`` (they read it once, at import)."""

    def __enter__(self) -> None:
        from datasets import config as dconfig  # heavy: only around a hub load that must stay local
        from huggingface_hub import constants  # heavy: as above

        self.saved = (dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
        dconfig.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: Any) -> None:
        from datasets import config as dconfig  # heavy: only around a hub load that must stay local
        from huggingface_hub import constants  # heavy: as above

        dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = self.saved


def _is_local_folder(name: str) -> bool:
    return Path(name).expanduser().is_dir()
