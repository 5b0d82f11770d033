"""Evaluating the runs of a pack (orchestration): their validation during training, and when a run finishes the
test metrics and sharpness of its best and final heads, gathered into its results record (``RunResults``, what
results.json holds and ``align compare`` reads).

Best head: the validation score named by ``eval.select`` — ``mean_R@1`` (mean of image→text and text→image R@1,
the default: retrieval is what a head is for, and it separates runs better than R@5), ``mutual_knn`` (the paper's
alignment figure) or, on a labelled set, ``zeroshot_top1`` (zero-shot accuracy; on mnist, whose captions only name
the digit, it is the one that measures the head). ``max_val`` holds the best of every validation metric over
training as well (the paper's "best alignment over training"). A diverged run still reports its best head.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from align.cache.embeddings import EmbeddingRows
from align.metrics.measure import (
    NonFiniteFeatures,
    confusion_record,
    embedding_metrics,
    evaluate_head,
    head_sharpness,
    head_zero_shot,
    zero_shot,
)
from align.train.config import TrainConfig
from align.train.heads import AlignmentModel
from align.train.losses import loss_for
from align.train.pack import HeadPack
from align.train.run import Run
from align.train.run_data import RunData

EVAL_BYTES = 256 * 2 ** 20  # features held at once while validating a pack
Metrics = dict[str, float]


@dataclass
class RunResults:
    """A finished run's results: results.json's keys, in its order. Metric dicts are keyed by
    ``align.metrics.measure.metric_names``."""

    status: str  # "done" | "diverged"
    diverged_at: int | None  # step at which divergence was declared, else None
    diverge_reason: str | None  # one line, else None
    steps_done: int  # optimizer steps taken
    best_step: int | None  # step of the best validation score (None if no validation ran)
    select: str  # the validation metric that picked the best step
    best_val: Metrics | None
    final_val: Metrics | None
    best_test: Metrics | None
    final_test: Metrics | None
    max_val: Metrics  # best value of every validation metric over training (maximum; minimum for the ranks)
    loss_at_step: float | None  # mean training loss over the LOSS_WINDOW steps ending at loss_at_step_T
    loss_at_step_T: int  # that T (cfg.loss_at_step); None above if not reached
    final_loss: float | None  # mean training loss over the last LOSS_WINDOW steps
    sharpness: dict[str, Metrics | None]  # {"best": ..., "final": ...} at the training loss (head_sharpness)
    optimizer: str
    two_pass: bool
    skipped_perturbations: int  # SAM-family steps whose perturbation a zero or non-finite norm skipped
    config_hash: str
    device: str
    precision: str  # "bf16" | "fp32"
    wall_time_s: float  # training + evaluation time summed over all sessions of the run
    zeroshot: dict[str, Any] | None  # labelled test split: the best head's zero-shot confusion, else None
    # Last, after the keys results.json had before them: the longest stretch of consecutive steps with |loss −
    # uniform loss| ≤ uniform_plateau_tol · uniform loss (``align.train.collapse``), and whether it reaches
    # collapse_fraction of schedule.steps (None: unknown, resumed from a checkpoint written before they were counted)
    uniform_plateau_steps: int | None
    collapsed: bool | None

    def to_json(self) -> dict[str, Any]:
        """The record as results.json holds it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


class RunEvaluator:
    """Measures the heads of one pack's runs: validation of the pack's heads, then test, sharpness and zero-shot
    confusion of one head at a time, on a copy of the pack's architecture."""

    def __init__(self, cfg: TrainConfig, data: RunData, device: torch.device, template: AlignmentModel,
                 precision: str) -> None:
        self.cfg, self.data, self.device, self.precision = cfg, data, device, precision
        self.model = copy.deepcopy(template)  # evaluates one head at a time (test, sharpness)
        self.loss_fn = loss_for(cfg.loss)

    def evaluate(self, split: str, state: dict[str, Tensor]) -> Metrics | None:
        """Metrics of one head on a role's split ("val" / "test"); None if its features are NaN/inf."""
        self.model.load_state_dict(state)
        try:
            return evaluate_head(self.model, getattr(self.data, split), self.cfg.eval, self.device)
        except NonFiniteFeatures:
            return None

    def validate(self, pack: HeadPack, slots: list[int]) -> list[Metrics | None]:
        """Validation metrics of the pack's heads at ``slots`` (None: NaN/inf features), encoded in bounded memory
        by fixed chunks of the pack's slots (a head's features come from a matmul of the same shape every time),
        the split's rows streamed through them ``CHUNK_ROWS`` at a time (never copied whole; a split of one chunk
        gives the bits of one matmul over all its rows)."""
        paired, ev, size = self.data.val, self.cfg.eval, pack.size
        per_head = (paired.num_images + paired.num_captions) * self.cfg.head.out_dim * 4
        chunk = max(1, EVAL_BYTES // max(1, per_head))
        first = paired.first_caption_per_image()
        prompts = None if paired.class_text is None else \
            paired.class_text.reshape(-1, paired.class_text.shape[2]).to(device=self.device, dtype=torch.float32)
        out: dict[int, Metrics | None] = {}
        for lo in range(0, size, chunk):
            wanted = [s for s in slots if lo <= s < lo + chunk]
            if not wanted:
                continue
            heads = slice(lo, min(lo + chunk, size))
            with torch.no_grad():
                img = self._encoded(pack, paired.image, "image", heads)
                txt = self._encoded(pack, paired.text, "text", heads)
                cls = None if prompts is None else pack.encode(prompts, "text", heads)
            for slot in wanted:
                g = slot - lo
                if not (bool(torch.isfinite(img[g]).all()) and bool(torch.isfinite(txt[g]).all())):
                    out[slot] = None
                    continue
                metrics, _ = embedding_metrics(img[g], txt[g], paired.caption_to_image, first, ev.ks, ev.knn_k,
                                               ev.backend)
                if cls is not None:  # the same prompt ensemble as evaluate_head's, on the pack's features
                    metrics.update(zero_shot(img[g], cls[g].view(*paired.class_text.shape[:2], -1), paired.labels)[0])
                out[slot] = metrics
        return [out[s] for s in slots]

    def _encoded(self, pack: HeadPack, split: EmbeddingRows, side: str, heads: slice) -> Tensor:
        """(G, N, out_dim) features of a split's rows through the heads selected, ``CHUNK_ROWS`` rows at a time."""
        parts = [pack.encode(rows.to(self.device), side, heads) for rows in split.chunks()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def test_and_sharpness(self, run: Run, weights: dict[str, Tensor] | None,
                           sharpness: bool = True) -> tuple[Metrics | None, Metrics | None]:
        """Test metrics and (with ``sharpness`` and eval.sharpness) sharpness of one head's weights (None, None for
        no head)."""
        if weights is None:
            return None, None
        ev = self.cfg.eval
        test = self.evaluate("test", weights) if ev.test_split else None
        sharp = None
        if sharpness and ev.sharpness and (test is not None or not ev.test_split):
            self.model.load_state_dict(weights)
            sharp = head_sharpness(self.model, self.loss_fn, *self.sharpness_rows(run), ev)
        return test, sharp

    def sharpness_rows(self, run: Run) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """(images, captions, batches): the rows of the run's fixed sharpness batches gathered from the training
        split onto the device, and each batch's positions in them (the values ``head_sharpness`` would index out
        of the whole split)."""
        fixed = run.sampler.fixed_batches(self.cfg.eval.sharpness_batches)
        train = self.data.train
        image = train.image.gather(torch.cat([i for i, _ in fixed])).to(self.device)
        text = train.text.gather(torch.cat([t for _, t in fixed])).to(self.device)
        bounds = torch.arange(len(image), device=self.device).split([len(i) for i, _ in fixed])
        return image, text, [(rows, rows) for rows in bounds]

    def final_val(self, run: Run, weights: dict[str, Tensor]) -> Metrics | None:
        """Validation metrics of the final head (reused when the last validation was at the final step)."""
        last = run.state.last_val
        if last is not None and last["step"] == run.state.step:
            return {k: v for k, v in last.items() if k != "step"}
        return self.evaluate("val", weights) if _finite(weights) else None

    def test_confusion(self, weights: dict[str, Tensor] | None) -> dict[str, Any] | None:
        """The zero-shot confusion matrix of one head on a labelled test split (None otherwise)."""
        test = self.data.test
        if weights is None or test is None or not test.labelled:
            return None
        self.model.load_state_dict(weights)
        return confusion_record(head_zero_shot(self.model, test, self.device)[1], test)

    def results(self, run: Run, final: dict[str, Tensor], skipped: int,
                wall_time: Callable[[], float]) -> RunResults:
        """A finished run's record: test and sharpness of its best and final heads (``final``: its weights now),
        ``skipped`` perturbations, and its wall time (``wall_time()``, read once they are measured)."""
        state = run.state
        final_val = self.final_val(run, final)
        best_test, best_sharp = self.test_and_sharpness(run, state.best.state)
        if final_val is not None and state.best.step == state.step:  # the final head is the best one
            final_test, final_sharp = best_test, best_sharp
        else:
            final_test, final_sharp = self.test_and_sharpness(run, final if final_val is not None else None,
                                                              sharpness=run.cfg.eval.sharpness_final)
        diverged, wall_time_s = state.diverged, wall_time()
        return RunResults(
            status="diverged" if diverged else "done", diverged_at=diverged["step"] if diverged else None,
            diverge_reason=diverged["reason"] if diverged else None, steps_done=state.step,
            best_step=state.best.step, select=run.cfg.eval.select, best_val=state.best.val, final_val=final_val,
            best_test=best_test, final_test=final_test, max_val=state.max_val, loss_at_step=state.loss_at_step,
            loss_at_step_T=run.cfg.loss_at_step, final_loss=state.recent_loss(),
            sharpness={"best": best_sharp, "final": final_sharp}, optimizer=run.cfg.optim.name,
            two_pass=run.two_pass, skipped_perturbations=skipped, config_hash=run.cfg_hash, device=str(self.device),
            precision=self.precision, wall_time_s=wall_time_s,
            zeroshot=self.test_confusion(state.best.state) if best_test is not None else None,
            uniform_plateau_steps=state.longest_plateau, collapsed=run.collapsed())
