"""Text-to-image search through a trained run's heads (orchestration): what ``align search`` prints and draws.

The images are a plain folder (embedded now by the run's encoders, ``align.eval.trained``) or a cache made by the
run's encoders (its rows through the image head, as ``align eval RUN --cache`` takes them). Each caption query
ranks them by the cosine of the head features, best first (ties: the lower index), and ``gallery`` draws the
top-k of every query with the retrieval gallery of ``align eval``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor

from align.cache.read import source_rows
from align.common.errors import AlignError
from align.common.files import require_writable
from align.data import datasets
from align.data.caption_set import image_files, open_image
from align.eval.evaluate import run_cache
from align.eval.plots import gallery_figure
from align.eval.trained import TrainedRun, load_run
from align.metrics.measure import top_images


@dataclass
class Gallery:
    """The images searched: each one's name (a file name, or a cached image's id), its features through the head,
    and how to show it (``load(i)`` → PIL image; None where align never had the images)."""

    names: list[str]
    features: Tensor
    load: Callable[[int], Any] | None
    what: str  # for the gallery's title


def search(run_dir: str | Path, texts: Sequence[str], images: str | Path | None = None, cache: str | Path | None = None,
           k: int = 5, gallery: str | Path | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """The top-``k`` images of a folder (``images``) or a cache folder (``cache``) for each caption of ``texts``,
    through the heads of the run in ``run_dir`` → [{"text", "hits": [{"rank", "image", "row", "score"}]}];
    with ``gallery`` the PNG of them too. Every check (one AlignError line) comes before any work."""
    texts = list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise AlignError("give at least one caption to search with (--text \"a red circle\"), none of them empty")
    if (images is None) == (cache is None):
        raise AlignError("give either --images FOLDER (image files) or --cache KEY (a cache of the run's encoders)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AlignError(f"-k must be a whole number >= 1, got {k!r}")
    if gallery is not None:
        require_writable(Path(gallery), "gallery PNG", "give another --gallery", file=True)
    files = image_files(images) if images is not None else None  # before the encoders are built
    run = load_run(run_dir, device=device)
    found = _folder(run, Path(images), files) if files is not None else _cache(run, Path(cache), gallery is not None)
    scores, hits = top_images(found.features, run.encode_texts(texts), k)
    rows = [{"text": text, "hits": [{"rank": r + 1, "image": found.names[j], "row": j, "score": float(s)}
                                    for r, (s, j) in enumerate(zip(scores[q].tolist(), hits[q].tolist()))]}
            for q, text in enumerate(texts)]
    if gallery is not None:
        drawn = [{"text": row["text"], "hits": [{"image": found.load(h["row"]), "score": h["score"], "own": False,
                                                 "label": ""} for h in row["hits"]]} for row in rows]
        gallery_figure(Path(gallery), drawn, f"{run.path.name} ({run.checkpoint['checkpoint']}): top {k} of "
                                              f"{found.what}")
    return rows


def _folder(run: TrainedRun, folder: Path, files: list[Path]) -> Gallery:
    """A folder's image files, embedded now by the run's encoders and heads."""
    return Gallery([f.name for f in files], run.encode_images(files), lambda i: open_image(files[i], files[i].name),
                   f"{len(files)} images in {folder.name}")


def _cache(run: TrainedRun, folder: Path, drawn: bool) -> Gallery:
    """A cache of the run's encoders: its image rows through the head, named by the source's image ids."""
    paired, spec = run_cache(run.config, folder)
    if spec is None and drawn:
        raise AlignError(f"no gallery for cache {folder.name}: it names no dataset to read the images from "
                         "(embeddings made elsewhere, `align cache import`): drop --gallery")
    names, load = [f"row {i}" for i in range(paired.num_images)], None
    if spec is not None:
        image_rows, _ = source_rows(folder)
        data = datasets.load_image_caption_split(spec, paired.meta["split"])
        names = [str(data.image_ids[int(r)]) for r in image_rows]
        load = lambda i: data.load_image(int(image_rows[i]))  # noqa: E731
    return Gallery(names, run.project_images(paired.image), load, f"{paired.num_images} images of {folder.name}")
