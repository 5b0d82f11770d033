"""Evaluate a trained run or a raw cache from disk (orchestration): load through the edges, measure, record.

The measurements themselves are pure and live in ``align.measure``; this module finds the head and the
embeddings (``align.runs``, ``align.cache``) and records a run's evaluation in its run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from align.errors import AlignError, is_out_of_memory, out_of_memory_error
from align.measure import evaluate_embeddings, evaluate_head
from align.progress import Log
from align.runs import RunDir, json_safe


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", device: str | None = None,
                 backend: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Evaluate a trained run's head on ``split`` → results dict, also written to RUN/eval/SPLIT-CHECKPOINT.json."""
    from align.config import load_config
    from align.device import pick_device
    from align.heads import build_model
    from align.train import check_head_fits, load_data, resolve_dims
    from align.train_config import TrainConfig

    run = RunDir(run_dir)
    if not run.is_run():
        raise AlignError(f"{run.path} is not a run directory (no {run.config_path.name}): give the folder align "
                         "train wrote")
    cfg = load_config(TrainConfig, run.config_path)
    if backend is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    if split not in cfg.data.splits:
        raise AlignError(f"split {split!r} is not in the run's data.splits ({', '.join(cfg.data.splits)})")
    state, meta = run.load_head(checkpoint)
    paired = load_data(cfg, [split])[split]
    cfg = resolve_dims(cfg, paired)
    notes = [] if cfg.eval.knn_k < paired.num_images else [  # said, so that they are not missing without a word
        f"mutual_knn/cknna skipped: {paired.num_images} images is not more than the run's eval.knn_k={cfg.eval.knn_k}"]
    dev = pick_device(device or cfg.device)
    check_head_fits(cfg, dev, training=False)
    try:
        model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim)
        _load_head_state(model, state, run.path)
        model.to(dev)
        metrics = evaluate_head(model, paired, cfg.eval, dev)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(f"evaluating {run.path} on {dev}", exc, "use --device cpu or free memory") from None
        raise
    result = {"source": str(run.path), "kind": "run", "checkpoint": checkpoint, "step": meta.get("step"),
              "split": split, "num_images": paired.num_images, "num_captions": paired.num_captions,
              "metrics": metrics, "notes": notes}
    out = run.write_eval(split, checkpoint, result)
    if log:
        log(f"wrote {out}")
    return json_safe(dict(result, written_to=str(out)))


def _load_head_state(model: torch.nn.Module, state: dict[str, Tensor], run_dir: Path) -> None:
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


def evaluate_cache(key_or_path: str | Path, split: str | None = None, cache_root: str | Path | None = None,
                   ks: Sequence[int] = (1, 5, 10), knn_k: int = 8, backend: str = "faiss") -> dict[str, Any]:
    """Metrics of the raw embeddings in a cache folder, or of cache ``key`` (a unique prefix will do) under ``cache_root``."""
    from align.cache import find_cache, load_cache_dir

    path = find_cache(key_or_path, cache_root)
    paired = load_cache_dir(path)
    if split is not None and paired.meta.get("split") != split:
        raise AlignError(f"cache {path.name} holds split {paired.meta.get('split')!r}, not {split!r}: "
                         "give the key of that split (align cache ls)")
    return evaluate_embeddings(paired, ks=ks, knn_k=knn_k, backend=backend, source=str(path))
