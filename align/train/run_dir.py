"""Run directories on disk: resolved config, per-step metrics, checkpoints and results (the edge of training).

Layout of a run directory::

    RUN/config.yaml                     the resolved TrainConfig (``align train --config RUN/config.yaml`` re-runs it)
    RUN/metrics.jsonl                   one JSON object per training step and per validation
    RUN/checkpoints/step-000200.safetensors + step-000200.json
                                        the full training state (tensors | the rest); the JSON is written last
                                        and names the tensor file's SHA-256, so a checkpoint counts only when both
                                        halves are there and agree (a kill between the two writes loses nothing)
    RUN/checkpoints/best.safetensors + best.json   the head weights with the best validation score
    RUN/results.json                    what ``align compare`` reads
    RUN/tensorboard/, RUN/wandb/, RUN/tracking.json   with ``report_to``: the trackers' files and run ids
                                        (``align.train.tracking``)

Every write is atomic (temporary file in the same folder + ``os.replace``). No pickle anywhere: tensors go to
safetensors, everything else to JSON; what a checkpoint holds, and how, is ``align.train.checkpoint``'s codec.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from align.common import distributed, files, paths
from align.common.files import atomic_write_bytes, atomic_write_text, json_text, read_json, write_json
from align.common.config import load_yaml
from align.common.errors import AlignError, shorten
from align.common.locks import LOCK_FILE, exclusive
from align.train.checkpoint import head_weights
from align.train.identity import config_hash, diff_keys, hashed_view
from align.train.tracking import RunTracking

CONFIG_FILE = paths.SAVED_CONFIG
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
RUN_MARKS = (METRICS_FILE, RESULTS_FILE, CHECKPOINT_DIR, LOCK_FILE)  # what only a run folder holds beside config.yaml
_STEP_RE = re.compile(r"^step-(\d+)\.json$")
RESUME_HEADER = (f"# align train --config RUN/{CONFIG_FILE} --resume   (continue or finish this run; RUN: this "
                 "folder, wherever it is)\n"
                 f"# align train --config RUN/{CONFIG_FILE} --out NEW_DIR   (train it again into NEW_DIR)\n")


def write_config(run_dir: Path, text: str) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, text)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to metrics.jsonl as one line. A write that fails (no space left) is cut off again, so
    the log keeps whole lines; a kill mid-write can still leave a torn last line, which readers skip."""
    path = Path(run_dir) / METRICS_FILE
    data = memoryview((json_text(record, indent=None) + "\n").encode("utf-8"))
    with files.writing(path), open(path, "ab", buffering=0) as fh:  # unbuffered: nothing left to flush after a failure
        size = fh.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[fh.write(data):]
        except OSError:
            os.ftruncate(fh.fileno(), size)  # truncating frees space, so it works on a full disk too
            raise


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl. A torn last line (a kill mid-write) is skipped; a damaged line before it
    is an AlignError, since dropping it would silently lose a record."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            if number == len(lines):  # no newline after it: the write was torn
                continue
            raise AlignError(f"line {number} of {path} is damaged (not a UTF-8 JSON record): the run's log cannot "
                             "be trusted; train it again with --out NEW_DIR") from None
        out.append(record)
    return out


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only the records up to ``last_step`` (resuming from that checkpoint re-logs the rest)."""
    path = Path(run_dir) / METRICS_FILE
    kept = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= last_step]
    if path.exists() or kept:
        atomic_write_text(path, "".join(json_text(r, indent=None) + "\n" for r in kept))


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RESULTS_FILE, results)


def read_results(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / RESULTS_FILE)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save  # heavy: only when tensors are written

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` (tensor file first, then the JSON naming its hash); keep the newest ``keep``
    (0: keep every one, for ``prune_checkpoints`` to thin later)."""
    folder = checkpoint_dir(run_dir)
    data = _tensor_bytes(tensors)
    atomic_write_bytes(folder / f"step-{step:07d}.safetensors", data)
    meta = dict(meta, step=step, tensors_sha256=hashlib.sha256(data).hexdigest())
    path = folder / f"step-{step:07d}.json"
    write_json(path, meta)
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (JSON half first: a half-deleted one is no checkpoint)."""
    folder = checkpoint_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        (folder / f"step-{old:07d}.json").unlink(missing_ok=True)
        (folder / f"step-{old:07d}.safetensors").unlink(missing_ok=True)


def list_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints whose JSON half exists, ascending."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_RE.match(p.name)))


def load_checkpoint(run_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of checkpoint ``step``; AlignError if its halves are missing or disagree."""
    from safetensors.torch import load  # heavy: only when tensors are read

    folder = checkpoint_dir(run_dir)
    meta = read_json(folder / f"step-{step:07d}.json")
    tensor_path = folder / f"step-{step:07d}.safetensors"
    if not tensor_path.is_file():
        raise AlignError(f"checkpoint {tensor_path} is missing; delete {folder / f'step-{step:07d}.json'} to "
                         "fall back to an earlier checkpoint")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise AlignError(f"checkpoint {tensor_path} does not match its JSON (damaged or half-written); delete "
                         "both step files to fall back to an earlier checkpoint")
    return load(data), meta


def latest_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint, skipping damaged ones, or None if there is none."""
    for step in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(run_dir, step)
        except AlignError:
            continue
    return None


def save_head(run_dir: Path, name: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write head weights ``checkpoints/NAME.safetensors`` and their description ``NAME.json``."""
    folder = checkpoint_dir(run_dir)
    data = _tensor_bytes(state)
    atomic_write_bytes(folder / f"{name}.safetensors", data)
    write_json(folder / f"{name}.json", dict(meta, tensors_sha256=hashlib.sha256(data).hexdigest()))


def load_head(run_dir: Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Head weights and their description: ``which`` = "best" or "last" (the newest training checkpoint)."""
    from safetensors.torch import load  # heavy: only when tensors are read

    folder = checkpoint_dir(run_dir)
    if which == "last":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise AlignError(f"{run_dir} has no checkpoint yet: train it first (align train ... --out {run_dir})")
        tensors, meta = found
        return head_weights(tensors), {"step": meta["step"], "config_hash": meta.get("config_hash")}
    if which != "best":
        raise AlignError(f"unknown checkpoint {which!r}: use best or last")
    path = folder / "best.safetensors"
    if not path.is_file() or not (folder / "best.json").is_file():
        raise AlignError(f"{run_dir} has no best checkpoint (no validation finished yet): use --checkpoint last")
    meta = read_json(folder / "best.json")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise AlignError(f"{path} does not match best.json (damaged or half-written): use --checkpoint last")
    return load(data), meta


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class RunLocation:
    """Where a run lives (absolute) and how its config.yaml names that place (``out_dir``, read back against the
    data root: ``align.common.paths.in_data_root``)."""

    path: Path
    out_dir: str


def default_run_dir(config_path: str | Path) -> Path:
    """<data root>/runs/<config file name without extension>: where a config that names no out_dir trains."""
    return paths.runs_dir() / Path(config_path).stem


def locate_run(config_path: str | Path, out_dir: str | None, out: str | Path | None = None,
               out_dir_set: bool = False, resume: bool = False) -> RunLocation:
    """Where ``align train --config config_path`` trains, first rule that applies: ``out`` (--out, relative to the
    working folder it was typed in); an ``out_dir`` set on the command line (``out_dir_set``); the folder of a run's
    own config.yaml (a copied or moved run folder continues where it is); the config's ``out_dir`` (relative: under
    the data root); <data root>/runs/<config name>. Never the working folder of a later command: the path is
    absolute, and config.yaml names it as given or relative to the data root.

    With ``resume``, AlignError (one line) when that folder holds no run. Under torchrun rank 0 looks and every
    rank hears its answer (or its refusal)."""
    return distributed.from_main(lambda: _locate(Path(config_path), out_dir, out, out_dir_set, resume))


def _locate(config_path: Path, out_dir: str | None, out: str | Path | None, out_dir_set: bool,
            resume: bool) -> RunLocation:
    own = None if out is not None or out_dir_set else paths.saved_config_folder(config_path, RUN_MARKS)
    if out is not None:
        path = Path(os.path.abspath(Path(out).expanduser()))
    elif own is not None:
        path = own
    elif out_dir:
        path = paths.in_data_root(out_dir)
    else:
        path = Path(os.path.abspath(default_run_dir(config_path)))
    as_given = out is None and bool(out_dir) and paths.in_data_root(out_dir) == path
    where = RunLocation(path, out_dir if as_given else paths.relative_to_data_root(path))
    if resume and not RunDir(path).was_started():
        raise AlignError(shorten(f"--resume: no run to continue in {path}: leave out --resume to start one there, "
                                 f"or give the run's own --config RUN/{CONFIG_FILE}"))
    return where


class RunDir:
    """A run directory's bookkeeping for the training loop and evaluation: what it holds, and every write to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tracking: RunTracking | None = None  # the trackers its records also go to (``reporting``)

    @classmethod
    def for_rank(cls, path: str | Path, job: distributed.Rank) -> "RunDir":
        """The run directory as rank ``job`` sees it under torchrun: rank 0 (or a single process) writes it, the
        other ranks hold its read-only twin (reads work, writes do nothing)."""
        return RunDir(path) if job.is_main else ReadOnlyRunDir(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    def is_run(self) -> bool:
        """Whether the folder has a run's config.yaml (what evaluation needs)."""
        return is_run_dir(self.path)

    def is_finished(self) -> bool:
        """Whether the run wrote its results (it trained to the end or diverged)."""
        return self.results_path.exists()

    def holds_run(self) -> bool:
        """Whether anything of a run is here: a config, a checkpoint or results."""
        return is_run_dir(self.path) or bool(list_checkpoints(self.path)) or self.results_path.exists()

    def was_started(self) -> bool:
        """Whether a run was started here: it holds a run, or the first files one writes (its lock, metrics), as a
        run that failed before its config.yaml leaves them (its resume then starts at step 0)."""
        return self.holds_run() or any((self.path / mark).exists() for mark in RUN_MARKS)

    def check_location(self) -> None:
        """AlignError unless the run directory is a folder or can become one (no file in its place or above it)."""
        files.require_folder_path(self.path, "run directory")

    def check_writable(self) -> None:
        """``check_location``, and that the run directory can be written (before any work: a read-only disk, no
        permission, a name too long or a link loop is one AlignError line; the check leaves nothing behind)."""
        files.require_writable(self.path, "run directory", "use --out NEW_DIR, or set ALIGN_HOME")

    def check(self, cfg_hash: str, config: dict[str, Any], resume: bool) -> str:
        """What this folder holds for a run of ``config``: "fresh", "resume" or "finished"; AlignError on a clash.

        Only reads; nothing is written until every check has passed.
        """
        self.check_location()
        if not self.holds_run():
            return "fresh"
        if not resume:
            raise AlignError(f"{self.path} already holds a run: add --resume to continue it, or use --out NEW_DIR")
        if is_run_dir(self.path):
            self._check_saved_config(cfg_hash, config)
        for step in list_checkpoints(self.path):
            meta = read_json(checkpoint_dir(self.path) / f"step-{step:07d}.json")
            if meta.get("config_hash") != cfg_hash:
                keys = diff_keys(meta.get("config", {}), config)
                raise AlignError(f"checkpoint step {step} in {self.path} comes from another configuration (differs "
                                 f"in: {', '.join(keys) or 'unknown'}): resume with the run's config.yaml or use "
                                 "--out NEW_DIR")
        return "finished" if self.results_path.exists() else "resume"

    def _check_saved_config(self, cfg_hash: str, config: dict[str, Any]) -> None:
        saved = hashed_view(load_yaml(self.config_path))
        if config_hash(saved) != cfg_hash:
            keys = diff_keys(saved, config)
            raise AlignError(f"{self.path} was trained with another configuration (differs in: "
                             f"{', '.join(keys) or 'unknown'}): resume with its own config.yaml or use --out NEW_DIR")

    def lock(self) -> Any:
        """Context manager: this process is the run directory's only writer (AlignError naming the holder)."""
        return exclusive(self.path, "run directory", "another align train is writing it; wait for it to finish "
                                                     "or use --out NEW_DIR")

    def begin(self, resumed_step: int) -> None:
        """Create the folder, drop metrics records and checkpoints past ``resumed_step`` (0: a fresh start keeps
        none; a pack that resumes at an older step than a run's newest recomputes the rest) and the temporary files
        a killed writer left behind (we hold the lock, so none of them is being written)."""
        self.path.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resumed_step)
        folder = checkpoint_dir(self.path)
        for step in list_checkpoints(self.path):
            if step > resumed_step:
                (folder / f"step-{step:07d}.json").unlink(missing_ok=True)
                (folder / f"step-{step:07d}.safetensors").unlink(missing_ok=True)
        for folder in (self.path, checkpoint_dir(self.path)):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else []:
                stale.unlink(missing_ok=True)

    def write_config(self, yaml_text: str) -> None:
        """The resolved config, headed by the commands that resume it and re-run it elsewhere. They name the folder
        as RUN, not by its path: a copied or moved run folder resumes where it is, so they stay true there too."""
        write_config(self.path, RESUME_HEADER + yaml_text)

    @contextlib.contextmanager
    def reporting(self, report_to: list[str], group: str | None, config: dict[str, Any]) -> Iterator[None]:
        """While the block runs, every record appended to metrics.jsonl and the results also go to the trackers
        ``report_to`` (the run's tracker runs, named by this folder and grouped by ``group``, opened or continued
        with ``config`` as hyper-parameters, given first the records of metrics.jsonl they lack: after ``begin``)."""
        if not report_to:
            yield
            return
        self.tracking = RunTracking.open(report_to, self.path, group, config, read_metrics(self.path))
        failed = True
        try:
            yield
            failed = False
        finally:
            tracking, self.tracking = self.tracking, None
            tracking.close(failed)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_metrics(self.path, record)
        if self.tracking is not None:  # after the log: metrics.jsonl holds whatever a tracker holds
            self.tracking.record(record)

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> None:
        save_checkpoint(self.path, step, tensors, meta, keep=keep)

    def prune_checkpoints(self, keep: int) -> None:
        prune_checkpoints(self.path, keep)

    def latest_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        return latest_checkpoint(self.path)

    def checkpoint_steps(self) -> list[int]:
        return list_checkpoints(self.path)

    def load_checkpoint(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_checkpoint(self.path, step)

    def save_head(self, name: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        save_head(self.path, name, state, meta)

    def load_head(self, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_head(self.path, which)

    def write_results(self, results: dict[str, Any]) -> None:
        write_results(self.path, results)
        if self.tracking is not None:
            self.tracking.results(results)

    def read_results(self) -> dict[str, Any]:
        return read_results(self.path)

    def write_eval(self, split: str, checkpoint: str, result: dict[str, Any]) -> Path:
        """Record an evaluation as RUN/eval/SPLIT-CHECKPOINT.json; returns that path."""
        out = self.path / "eval" / f"{split}-{checkpoint}.json"
        write_json(out, result)
        return out


class ReadOnlyRunDir(RunDir):
    """A run directory as the ranks other than 0 of a torchrun job see it: they read what rank 0 wrote (the
    checkpoint they resume from, a finished run's results) and write nothing, not even its lock."""

    def lock(self) -> Any:
        return contextlib.nullcontext()

    def begin(self, resumed_step: int) -> None:
        pass

    def reporting(self, report_to: list[str], group: str | None, config: dict[str, Any]) -> Any:
        return contextlib.nullcontext()  # rank 0 reports for the job

    def write_config(self, yaml_text: str) -> None:
        pass

    def append_metrics(self, record: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> None:
        pass

    def prune_checkpoints(self, keep: int) -> None:
        pass

    def save_head(self, name: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def write_results(self, results: dict[str, Any]) -> None:
        pass

    def write_eval(self, split: str, checkpoint: str, result: dict[str, Any]) -> Path:
        return self.path / "eval" / f"{split}-{checkpoint}.json"
