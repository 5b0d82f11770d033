"""Evaluate a trained run or a raw cache from disk (orchestration): load through the edges, measure, record.

The measurements themselves are pure and live in ``align.measure``; this module finds the head and the
embeddings (``align.runs``, ``align.cache``) and records a run's evaluation in its run directory. On a labelled
split it adds zero-shot accuracy and draws the confusion matrix; ``gallery`` draws, for a few caption queries,
the top-5 images with their scores (the images are read again from the dataset the cache was made from).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from align.cache.key import IMPORTED, EmbedConfig
from align.cache.read import load_cache_dir, manifest_of, source_rows, split_manifest
from align.common.config import load_config, shorten
from align.common.device import pick_device
from align.common.errors import AlignError, is_out_of_memory, out_of_memory_error
from align.common.files import json_safe, require_writable
from align.common.progress import Log
from align.data import datasets
from align.data.datasets import DatasetSpec
from align.eval.plots import confusion_figure, gallery_figure
from align.metrics.measure import (confusion_record, encode, evaluate_embeddings, evaluate_head, head_zero_shot,
                                   top_images)
from align.train.config import TrainConfig
from align.train.heads import build_model
from align.train.memory import check_head_fits
from align.train.run_data import load_data, resolve_dims
from align.train.run_dir import RunDir


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", device: str | None = None,
                 backend: str | None = None, log: Log | None = None, gallery: Path | None = None,
                 cache: Path | None = None) -> dict[str, Any]:
    """Evaluate a trained run's head on ``split`` → results dict, also written to RUN/eval/SPLIT-CHECKPOINT.json
    (and its zero-shot confusion matrix to SPLIT-CHECKPOINT-confusion.png on a labelled split; the retrieval
    gallery to ``gallery`` when given). ``cache``: evaluate on that cache folder instead (any set embedded by the
    run's encoders, e.g. photos for a head trained on digits; ``align.cache.store.find_cache`` finds it by key),
    recorded as RUN/eval/cache-KEY-CHECKPOINT.json."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise AlignError(f"{run.path} is not a run directory (no {run.config_path.name}): give the folder align "
                         "train wrote")
    require_writable(run.path / "eval", "run's eval folder", "copy the run folder to a writable disk")
    _check_figure(gallery, "gallery PNG", "--gallery")
    cfg = load_config(TrainConfig, run.config_path)
    if backend is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    state, meta = run.load_head(checkpoint)
    paired, spec, split = _run_data(cfg, split, cache)
    if gallery is not None:
        _check_gallery_source(spec, split)
    cfg = resolve_dims(cfg, paired)
    notes = [] if cfg.eval.knn_k < paired.num_images else [  # said, so that they are not missing without a word
        f"mutual_knn/cknna skipped: {paired.num_images} images is not more than the run's eval.knn_k={cfg.eval.knn_k}"]
    dev = pick_device(device or cfg.device)
    check_head_fits(cfg, dev, paired.num_images + paired.num_captions, training=False)
    try:
        model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim)
        load_head_state(model, state, run.path)
        model.to(dev)
        metrics = evaluate_head(model, paired, cfg.eval, dev)
        confusion = head_zero_shot(model, paired, dev)[1] if paired.labelled else None
        features = _head_features(model, paired, dev) if gallery is not None else None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(f"evaluating {run.path} on {dev}", exc, "use --device cpu or free memory") from None
        raise
    result = {"source": str(run.path), "kind": "run", "checkpoint": checkpoint, "step": meta.get("step"),
              "split": split, "num_images": paired.num_images, "num_captions": paired.num_captions,
              "metrics": metrics, "notes": notes}
    if confusion is not None:
        result["zeroshot"] = confusion_record(confusion, paired)
    out = run.write_eval(split, checkpoint, result)
    written = [out]
    if confusion is not None:
        written.append(_confusion_png(out.with_name(f"{out.stem}-confusion.png"), result, f"{run.path.name}, {split}"))
    if features is not None and gallery is not None:
        written.append(draw_gallery(paired, *features, spec, gallery,
                                    f"{run.path.name} ({checkpoint}), {split}: through the heads"))
    if log:
        for path in written:
            log(f"wrote {path}")
    return json_safe(dict(result, written_to=str(out)))


def _check_figure(path: Path | None, what: str, option: str) -> None:
    """AlignError (one line) unless the figure ``path`` (when given) can be written: before the work, not after."""
    if path is not None:
        require_writable(path, what, f"give another {option}", file=True)


def _run_data(cfg: Any, split: str, cache: Path | None) -> tuple[Any, DatasetSpec | None, str]:
    """(embeddings, the dataset spec their images are read from, or None for an imported cache; the label of the
    evaluation): the run's own split, or another cache made by the run's encoders (AlignError naming both
    otherwise)."""
    if cache is None:
        if split not in cfg.data.splits:
            raise AlignError(f"split {split!r} is not in the run's data.splits ({', '.join(cfg.data.splits)})")
        spec = cfg.data.dataset if isinstance(cfg.data, EmbedConfig) else _image_source(split_manifest(cfg.data, split))
        return load_data(cfg, [split])[split], spec, split
    paired, spec = run_cache(cfg, Path(cache))
    return paired, spec, f"cache-{Path(cache).name}"


def run_cache(cfg: Any, path: Path) -> tuple[Any, DatasetSpec | None]:
    """Another cache made by the run's encoders (its TrainConfig ``cfg``), loaded: (embeddings, the dataset spec its
    images are read from, or None for an imported cache); AlignError naming both encoder pairs otherwise."""
    manifest = manifest_of(path)
    wanted = ({"image": cfg.data.image_encoder.describe(), "text": cfg.data.text_encoder.describe()}
              if isinstance(cfg.data, EmbedConfig) else split_manifest(cfg.data, "train")["encoders"])
    if {k: manifest["encoders"].get(k) for k in ("image", "text")} != {k: wanted.get(k) for k in ("image", "text")}:
        def pair(encoders: dict) -> str:
            return " + ".join(shorten(str(encoders.get(k)), 48) for k in ("image", "text"))

        raise AlignError(f"cache {path.name} was not embedded by the run's encoders: embed that set with the run's "
                         f"encoders (cache: {pair(manifest['encoders'])}; run: {pair(wanted)})")
    return load_cache_dir(path), _image_source(manifest)


def _image_source(manifest: dict[str, Any]) -> DatasetSpec | None:
    """The dataset a cache's images can be read back from (what its embed config named); None for a cache of
    embeddings made elsewhere (``align cache import``), whose images align never had."""
    if manifest["dataset"].get("kind") == IMPORTED or not isinstance(manifest.get("config"), dict):
        return None
    return DatasetSpec.model_validate(manifest["config"]["dataset"])


def _check_gallery_source(spec: DatasetSpec | None, what: str) -> None:
    if spec is None:
        raise AlignError(f"no gallery for {what}: its cache names no dataset to read the images from (embeddings "
                         "made elsewhere, `align cache import`): drop --gallery")


def _head_features(model: torch.nn.Module, paired: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    image, text = encode(model, paired, device)
    return image.cpu(), text.cpu()


def _confusion_png(path: Path, result: dict[str, Any], what: str) -> Path:
    top1 = result["metrics"].get("zeroshot_top1")
    title = f"zero-shot confusion, {what}" + (f" (top-1 {100 * top1:.1f}%)" if top1 is not None else "")
    return confusion_figure(path, result["zeroshot"]["confusion"], result["zeroshot"]["classes"], title)


def draw_gallery(paired: Any, image: Tensor, text: Tensor, spec: Any, path: Path, title: str, queries: int = 4,
                 k: int = 5) -> Path:
    """For ``queries`` images spread over the split, one caption each (the q-th query takes its image's caption q,
    cycling), the top-``k`` images by cosine, read again from the dataset ``spec`` the cache was made from → a
    PNG at ``path``."""
    if image.shape[1] != text.shape[1]:
        raise AlignError(f"no gallery: image dimension {image.shape[1]} differs from text dimension {text.shape[1]} "
                         "(no common space without a head): give a RUN_DIR instead of --cache")
    img_rows, cap_rows = source_rows(paired.meta["path"])
    data = datasets.load_image_caption_split(spec, paired.meta["split"])
    picks = torch.linspace(0, paired.num_images - 1, min(queries, paired.num_images)).round().long().unique()
    own_captions = [torch.nonzero(paired.caption_to_image == i).flatten() for i in picks.tolist()]
    chosen = torch.stack([caps[q % len(caps)] for q, caps in enumerate(own_captions)])
    scores, hits = top_images(image, text[chosen], k)
    names, labels = paired.class_names, paired.labels
    rows = []
    for q, own in enumerate(picks.tolist()):
        rows.append({"text": data.captions[int(cap_rows[int(chosen[q])])], "hits": [
            {"image": data.load_image(int(img_rows[j])), "score": float(s), "own": j == own,
             "same_class": labels is not None and int(labels[j]) == int(labels[own]),
             "label": names[int(labels[j])] if names is not None and labels is not None else ""}
            for s, j in zip(scores[q].tolist(), hits[q].tolist())]})
    return gallery_figure(path, rows, title)


def load_head_state(model: torch.nn.Module, state: dict[str, Tensor], run_dir: Path) -> None:
    """Load head weights; shape mismatches (cache rebuilt with other encoders) become one AlignError line."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise AlignError(f"the head in {run_dir} has {key} of shape {tuple(tensor.shape)} but the cached "
                             f"embeddings need {tuple(own[key].shape)}: the cache does not match the run's encoders")
    missing = sorted(set(own) - set(state)) + sorted(set(state) - set(own))
    if missing:
        raise AlignError(f"the head in {run_dir} does not match its config (keys {', '.join(missing[:4])}): "
                         "the checkpoint comes from another configuration")
    model.load_state_dict(state)


def evaluate_cache(path: Path, split: str | None = None, ks: Sequence[int] = (1, 5, 10), knn_k: int = 8,
                   backend: str = "faiss", gallery: Path | None = None, confusion: Path | None = None,
                   log: Log | None = None) -> dict[str, Any]:
    """Metrics of the raw embeddings in a cache folder (``align.cache.store.find_cache`` finds one by key);
    optionally the retrieval gallery and (when zero-shot is defined) the confusion matrix PNGs."""
    path = Path(path)
    _check_figure(gallery, "gallery PNG", "--gallery")
    _check_figure(confusion, "confusion matrix PNG", "--out")  # OUT-confusion.png
    paired = load_cache_dir(path)
    if split is not None and paired.meta.get("split") != split:
        raise AlignError(f"cache {path.name} holds split {paired.meta.get('split')!r}, not {split!r}: "
                         f"give the key of that split (`align cache ls --root {shlex.quote(str(path.parent))}`)")
    if gallery is not None and paired.image.shape[1] != paired.text.shape[1]:  # said before the work, not after
        raise AlignError(f"no gallery of raw embeddings: image dimension {paired.image.shape[1]} differs from text "
                         f"dimension {paired.text.shape[1]} (no common space without a head): give a RUN_DIR instead "
                         "of --cache")
    spec = _image_source(manifest_of(path)) if gallery is not None else None
    if gallery is not None:
        _check_gallery_source(spec, f"cache {path.name}")
    result = evaluate_embeddings(paired, ks=ks, knn_k=knn_k, backend=backend, source=str(path))
    written = []
    if confusion is not None and "zeroshot" in result:
        written.append(_confusion_png(confusion, result, f"raw embeddings of {path.name}"))
    if gallery is not None:
        written.append(draw_gallery(paired, paired.image.to_tensor(), paired.text.to_tensor(), spec, gallery,
                                    f"{path.name}: raw encoder embeddings (no head)"))
    for out in written:
        if log:
            log(f"wrote {out}")
    return result
