"""One run of a pack as the training loop holds it (orchestration): its config and run directory, its data order,
its head until the pack takes it over, its optimizer's hyper-parameters and its loop state — and the run's own
bookkeeping: the record of each step it logs, when it diverges, its validations and best head, its checkpoints.

Divergence ends a run cleanly: a non-finite training loss, or a collapse — the loss within ``diverge_tol`` of its
uniform-prediction value (ln B for CLIP) with ‖g‖ < ``diverge_grad_tol`` for ``diverge_patience`` consecutive
steps (the frozen state of a collapsed logit scale).

Collapse as the paper counts divergence is another thing, and does not end a run (``align.train.collapse``
defines it): a step is on the uniform plateau when |L − L_u| ≤ ``uniform_plateau_tol`` · L_u, whatever ‖g‖ is. The
run records its longest stretch of consecutive plateau steps (``uniform_plateau_steps``), and is "collapsed" when
that stretch is at least ``collapse_fraction`` of its ``schedule.steps``. In the default study SAM at ρ = 1 sits
there for 30–78 consecutive steps of 200 with ‖g‖ ≥ 0.07, far from the detector's 1e-3, and then recovers part way;
a fresh head starts there too, for the first 0–3 steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from align.common import distributed
from align.metrics.measure import update_best_over_training
from align.optim import optimizer_info
from align.train.checkpoint import (
    BestHead,
    LoopState,
    TrainingState,
    decode_checkpoint,
    encode_checkpoint,
    own_rank_optimizer,
    rng_state,
)
from align.train.collapse import collapse_steps, on_plateau
from align.train.config import TrainConfig, hashed_config
from align.train.heads import AlignmentModel, build_model
from align.train.identity import config_hash
from align.train.optimizer import head_hparams_of
from align.train.run_data import Sampler
from align.train.run_dir import RunDir


@dataclass
class Run:
    """One run of a pack: what it is (config, identity, optimizer), where it writes, and where it stands."""

    cfg: TrainConfig
    dir: RunDir
    sampler: Sampler  # its data order (shared with the runs of its seed)
    model: AlignmentModel | None  # its head, until the pack is built (then the pack holds the weights)
    rng: dict[str, Tensor]  # RNG state right after its head's initialisation (what its checkpoints hold)
    hparams: dict[str, Any]  # its optimizer, per head (``align.optim.batched.head_hparams``)
    state: LoopState = field(default_factory=LoopState)
    optim_saved: dict[str, Any] | None = None  # optimizer state of the checkpoint it resumes from
    results: dict[str, Any] | None = None  # results.json's record, once the run is finished
    config: dict[str, Any] = field(init=False)  # the part of its config its checkpoints must match
    cfg_hash: str = field(init=False)
    two_pass: bool = field(init=False)  # the SAM family: a perturbation and a second pass per step

    def __post_init__(self) -> None:
        self.config = hashed_config(self.cfg)
        self.cfg_hash = config_hash(self.config)
        self.two_pass = optimizer_info(self.cfg.optim.name).two_pass

    @classmethod
    def create(cls, cfg: TrainConfig, directory: RunDir, sampler: Sampler, device: torch.device) -> "Run":
        """The run at step 0: its head initialised from ``cfg.seed``. A config error (a knob its optimizer lacks)
        comes before anything is written."""
        hparams = head_hparams_of(cfg)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim).to(device)
        return cls(cfg, directory, sampler, model, rng_state(), hparams)

    def ended(self) -> bool:
        """Whether the run diverged or reached its last step (its results may still be due)."""
        return self.state.diverged is not None or self.state.step >= self.cfg.schedule.steps

    def resume_from(self, tensors: dict[str, Tensor], meta: dict[str, Any], device: torch.device,
                    job: distributed.Rank) -> None:
        """Take the run's state from one of its checkpoints: head, optimizer state, RNG, best head, counters."""
        saved = decode_checkpoint(tensors, meta, device)
        self.model.load_state_dict(saved.head)
        self.optim_saved = own_rank_optimizer(saved.optimizer, job, str(self.dir.path))
        self.rng, self.state = saved.rng, saved.loop

    def checkpoint(self, head: dict[str, Tensor], optimizer: dict[str, Any], wall_time_s: float,
                   keep: int | None = None) -> None:
        """Save a resumable checkpoint of the run at its step; ``keep``: how many of its newest checkpoints to keep
        (default: its config's; 0: all, to prune once the whole pack has written this step)."""
        tensors, meta = encode_checkpoint(TrainingState(head, optimizer, self.rng, self.state), self.cfg_hash,
                                          self.config, wall_time_s)
        self.dir.save_checkpoint(self.state.step, tensors, meta,
                                 keep=self.cfg.keep_checkpoints if keep is None else keep)

    def log_step(self, values: dict[str, Any], uniform: float) -> None:
        """Log one step's metrics record (``values``: the pack's numbers for this run) and count it; a non-finite
        loss (the step was not taken) or a collapse to the ``uniform`` loss ends the run as diverged."""
        state, loss = self.state, values["loss"]
        record: dict[str, Any] = {"kind": "train", "step": state.step + 1, "loss": loss, "lr": values["lr"]}
        if not math.isfinite(loss):
            state.diverged = {"step": state.step + 1,
                              "reason": f"non-finite training loss ({loss}) at step {state.step + 1}"}
            self.dir.append_metrics(dict(record, grad_norm=values["grad_norm"]))
            return  # that step was not taken: steps_done stays at the last finite one
        record.update(log_scale=values["log_scale"], grad_norm=values["grad_norm"])
        if self.two_pass:
            n, d = values["sam_grad_norm"], values["delta_norm"]
            record.update(perturbation_norm=d, effective_radius=d / n if n > 0 else 0.0,
                          skipped=bool(values["skipped"]))
        state.step += 1
        state.losses.append(loss)
        if state.step == self.cfg.loss_at_step:
            state.loss_at_step = state.recent_loss()
        self.dir.append_metrics(record)
        self._track_plateau(loss, uniform)
        self._track_collapse(loss, values["grad_norm"], uniform)

    def _track_plateau(self, loss: float, uniform: float) -> None:
        """Count the stretch of consecutive steps on the uniform plateau and keep the longest."""
        state = self.state
        state.plateau = state.plateau + 1 if on_plateau(loss, uniform, self.cfg.uniform_plateau_tol) else 0
        if state.longest_plateau is not None:
            state.longest_plateau = max(state.longest_plateau, state.plateau)

    def collapsed(self) -> bool | None:
        """Whether the run's longest uniform plateau reaches ``collapse_fraction`` of its steps (None: unknown)."""
        longest = self.state.longest_plateau
        return None if longest is None else longest >= collapse_steps(self.cfg.collapse_fraction,
                                                                      self.cfg.schedule.steps)

    def _track_collapse(self, loss: float, grad_norm: float, uniform: float) -> None:
        """Declare divergence after ``diverge_patience`` steps frozen at the uniform loss with a vanishing ‖g‖."""
        cfg, state = self.cfg, self.state
        collapsed = abs(loss - uniform) < cfg.diverge_tol and grad_norm < cfg.diverge_grad_tol
        state.stuck = state.stuck + 1 if collapsed else 0
        if state.stuck >= cfg.diverge_patience:
            state.diverged = {"step": state.step, "reason": f"collapsed: training loss stuck at the uniform value "
                              f"{uniform:.4f} with ‖g‖ < {cfg.diverge_grad_tol:g} for {state.stuck} steps "
                              f"(since step {state.step - state.stuck + 1})"}

    def log_validation(self, metrics: dict[str, float] | None, weights: Callable[[], dict[str, Tensor]]) -> None:
        """Log a validation and track the best head (``weights()``: the head now) and the best of every metric;
        None (the head's features became NaN/inf) ends the run as diverged."""
        state, ev = self.state, self.cfg.eval
        if metrics is None:
            state.diverged = {"step": state.step, "reason": f"the head's features became NaN/inf by step {state.step}"}
            return
        state.last_val = dict(metrics, step=state.step)
        self.dir.append_metrics({"kind": "val", "step": state.step, **metrics})
        update_best_over_training(state.max_val, metrics, ev.ks)
        score = metrics[ev.select]
        if math.isfinite(score) and (state.best.score is None or score > state.best.score):
            state.best = BestHead(step=state.step, score=score, val=metrics, state=weights())
            self.dir.save_head("best", state.best.state, {"step": state.step, "select": ev.select, "score": score,
                                                          "val": metrics, "config_hash": self.cfg_hash})
