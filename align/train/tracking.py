"""Experiment trackers a run reports to besides metrics.jsonl (edge: writes the trackers' files, and reaches a
tracker's server only where the user configured one): TensorBoard, Weights & Biases and MLflow, one small class
each behind one interface (``Tracker``), fed by the run directory (``align.train.run_dir.RunDir.reporting``).

What they get: every record metrics.jsonl gets, as it is appended (``train/…``: loss, lr, log_scale, grad_norm and
the SAM family's perturbation_norm, effective_radius, skipped; ``val/…``: every validation metric), at its step;
the finished run's test metrics and sharpness (``test/best/…``, ``test/final/…``, ``sharpness/…``, ``results/…``)
at its last step; and the resolved config as hyper-parameters (flattened to dotted keys, ``flat_params``).
metrics.jsonl stays the source of truth: a tracker that fails to log fails the run rather than diverge from it.

Resume: each tracker says which steps it already holds of each tag, read from its own files (TensorBoard's event
files, wandb's offline logs, MLflow's store), and is given only later ones: first the records of metrics.jsonl it
lacks (a killed run's trackers may be behind the log, or ahead of its checkpoint, or hold part of a step's tags),
then the new ones. No step is logged twice and none is missing. wandb's and MLflow's run ids are kept in
RUN/tracking.json, so a resumed run continues its tracker run instead of starting a second one.

Offline by default: TensorBoard writes event files into RUN/tensorboard/; wandb runs in offline mode (its files in
RUN/wandb/, ``wandb sync`` uploads them) unless ``WANDB_MODE`` says otherwise; MLflow writes a local ``file:`` store
under the data root (``$ALIGN_HOME/mlruns``) unless ``MLFLOW_TRACKING_URI`` names another. The trackers are
optional (``pip install 'align[track]'``): each is imported only when a run reports to it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from align.common import paths
from align.common.errors import AlignError, shorten
from align.common.files import read_json, write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
NONE = "none"  # report to no tracker (the default)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # what pip installs
TRACKING_FILE = "tracking.json"  # RUN/tracking.json: the wandb and MLflow run ids a resume continues
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the run's event files
# config keys TensorBoard's HParams view does not list: the run's folder is its run name there already, and as a
# column it differs in every cell and takes one of the five columns the view shows at first (a study's seed)
NOT_HPARAMS = ("out_dir",)
WANDB_DIR = "wandb"  # RUN/wandb/: wandb's run folders (offline-run-<time>-<id>/ in offline mode)
FLUSH_S = 10  # TensorBoard writes its events at least this often: curves are watched live
RECORD_KEYS = ("kind", "step")  # what a metrics.jsonl record holds besides its values
RESULT_SECTIONS = {"best_test": "test/best", "final_test": "test/final"}  # results.json's test sections → tags


def report_targets(value: str | Iterable[str] | None) -> list[str]:
    """``report_to`` as a list of tracker names: a comma-separated text or a list, each of ``TRACKERS`` or
    ``none`` (alone: no tracker), in the order given; ValueError naming a wrong one."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    for name in names:
        if name not in (*TRACKERS, NONE):
            raise ValueError(f"unknown tracker {name!r}: report_to takes {', '.join(TRACKERS)} or {NONE}, "
                             "comma-separated")
    if NONE in names and len(names) > 1:
        raise ValueError(f"report_to: {NONE} cannot be combined with a tracker ({', '.join(names)})")
    return list(dict.fromkeys(n for n in names if n != NONE))


def check_installed(names: Iterable[str]) -> None:
    """AlignError (one line) naming the first tracker of ``names`` whose package is not installed: checked before
    any work, so a run never trains without the tracker it was asked to report to."""
    for name in names:
        if not _installed(name):
            raise AlignError(f"--report-to {name}: {PACKAGES[name]} is not installed: pip install 'align[track]' "
                             f"(or pip install {PACKAGES[name]}), or leave {name} out")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a heavy import)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import known to fail
    return importlib.util.find_spec(module) is not None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """A config as hyper-parameters: nested keys dotted (``optim.lr``), numbers, text, booleans and None as they
    are, lists as JSON text (MLflow writes None as ``null``; TensorBoard leaves it out, so that a number stays a
    number in its HParams view)."""
    out: dict[str, bool | int | float | str | None] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def record_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record as tags (``train/loss``, ``val/mean_R@1``); booleans as 0/1."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in RECORD_KEYS and isinstance(value, (bool, int, float))}


def results_values(results: dict[str, Any]) -> dict[str, float]:
    """A finished run's test metrics, sharpness and loss summaries (results.json) as tags."""
    out: dict[str, float] = {}
    for section, prefix in RESULT_SECTIONS.items():
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}/{key}"] = float(value)
    for which, values in (results.get("sharpness") or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"sharpness/{which}/{key}"] = float(value)
    for key in ("loss_at_step", "final_loss"):
        if isinstance(results.get(key), (int, float)):
            out[f"results/{key}"] = float(results[key])
    return out


class Tracker:
    """One tracker's run: the steps it already holds (``held``, ``floor``), logging into it, closing it."""

    floor = 0  # every step up to this one is held for every tag (a server's history, when its steps are all known)

    def held(self) -> dict[str, int]:
        """The last step this tracker's run holds of each tag, by the tracker's own name for it (``key``): per tag,
        since a killed writer may have written part of a step's tags."""
        return {}

    def key(self, tag: str) -> str:
        """The name this tracker gives ``tag``."""
        return tag

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        """Flush and close the run (``failed``: the training stopped on an error; a resume continues it)."""


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/ (one more per session); the config in TensorBoard's HParams view, less
    ``NOT_HPARAMS``."""

    def __init__(self, folder: Path, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when a run reports to TensorBoard

        self._held = event_steps(folder)  # before this session's file exists
        self.writer = SummaryWriter(str(folder), flush_secs=FLUSH_S)
        listed = {key: value for key, value in params.items() if key not in NOT_HPARAMS}
        self.writer.file_writer.add_summary(session_start(listed))

    def held(self) -> dict[str, int]:
        return self._held

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def session_start(params: dict[str, Any]) -> Any:
    """A TensorBoard summary of one session's hyper-parameters (what its HParams view lists and filters by);
    booleans stay booleans (torch's ``hparams`` writes them as numbers) and None is left out."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata  # heavy: TensorBoard's protos
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2  # heavy: as above

    info = plugin_data_pb2.SessionStartInfo()
    for key, value in params.items():
        if value is None:
            continue  # unset (ρ of AdamW): absent, so the parameter keeps its number type
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = str(value)
    content = plugin_data_pb2.HParamsPluginData(session_start_info=info, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_START_INFO_TAG,
                                        metadata=SummaryMetadata(plugin_data=plugin))])


def event_steps(folder: Path) -> dict[str, int]:
    """The last step of each tag in the TensorBoard event files of ``folder`` (a torn last event, from a killed
    writer, is skipped by the reader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # heavy: TensorBoard's reader

    held: dict[str, int] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    held[value.tag] = max(held.get(value.tag, 0), int(event.step))
    return held


class WandbTracker(Tracker):
    """A wandb run in RUN/wandb/, offline unless ``WANDB_MODE`` says otherwise; resumed by its id."""

    def __init__(self, run_path: Path, name: str, group: str | None, config: dict[str, Any],
                 run_id: str | None) -> None:
        import wandb  # heavy: only when a run reports to wandb

        self.id = run_id or uuid.uuid4().hex[:12]  # wandb takes [a-z0-9] ids
        self._held = wandb_steps(run_path / WANDB_DIR, self.id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "align", name=name, group=group, id=self.id, resume="allow",
            dir=str(run_path), mode=os.environ.get("WANDB_MODE") or "offline", config=config,
            reinit="create_new",  # a pack logs each of its heads to its own run, all open at once
            # no console capture (workers share a terminal) and no system sampler per head of a pack
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        # online, a resumed run starts after the server's history (its rows are whole: every tag of a step)
        self.floor = max(0, int(getattr(self.run, "starting_step", 0) or 0) - 1)

    def held(self) -> dict[str, int]:
        return self._held

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


WANDB_BLOCK = 32768  # wandb's transaction log (.wandb) is a LevelDB-style log of 32 KiB blocks
WANDB_HEADER = 7  # ":W&B", magic, version at the start; then each record is crc32, length, type and its bytes


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a wandb transaction log (``run-<id>.wandb``), each a serialised ``Record`` protobuf; a torn
    or damaged tail (a killed writer) ends the log."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_HEADER:  # the rest of a block too small for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + WANDB_HEADER])
        chunk = data[pos + WANDB_HEADER:pos + WANDB_HEADER + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pos += WANDB_HEADER + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        else:  # last
            yield pending + chunk


def wandb_history(folder: Path, run_id: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of every history row that wandb wrote for run ``run_id`` into ``folder`` (RUN/wandb/),
    over all its sessions (a resumed offline run writes a run folder per session), in order."""
    from wandb.proto import wandb_internal_pb2  # heavy: only to read wandb's offline logs

    rows = []
    for log in sorted(folder.glob(f"*-{run_id}/run-{run_id}.wandb")) if folder.is_dir() else []:
        for data in wandb_records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            values = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    values[key] = float(json.loads(item.value_json))
            rows.append((int(record.history.step.num), values))
    return rows


def wandb_steps(folder: Path, run_id: str) -> dict[str, int]:
    """The last step of each tag that wandb's offline logs of run ``run_id`` hold."""
    held: dict[str, int] = {}
    for step, values in wandb_history(folder, run_id):
        for tag in values:
            held[tag] = max(held.get(tag, 0), step)
    return held


def mlflow_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a local ``file:`` store under the data root ($ALIGN_HOME/mlruns)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.mlflow_dir().absolute().as_uri()


class MlflowTracker(Tracker):
    """An MLflow run in the study's experiment (a lone run: ``MLFLOW_EXPERIMENT_NAME``, else "align"), written
    through the client (several runs of a pack at once); resumed by its id when the store still has it."""

    def __init__(self, name: str, group: str | None, params: dict[str, Any], saved: dict[str, Any]) -> None:
        self.uri = mlflow_uri()
        if self.uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked; mlflow-skinny has no other
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by default: no usage reports either
        from mlflow.exceptions import MlflowException  # heavy: only when a run reports to MLflow
        from mlflow.tracking import MlflowClient  # heavy: as above

        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == self.uri else None
        if self.run_id is not None:
            try:
                self.client.get_run(self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:  # the store no longer has it: a new run, given the whole log again
                self.run_id = None
        if self.run_id is None:
            experiment = group or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "align"
            run = self.client.create_run(self._experiment_id(experiment), run_name=name)
            self.run_id = run.info.run_id
            self._log_params(params)

    def _experiment_id(self, name: str) -> str:
        """The experiment called ``name``, made if missing (a study's workers may race to make it)."""
        from mlflow.exceptions import MlflowException  # heavy: only when a run reports to MLflow

        for _ in range(3):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another worker made it first
                time.sleep(0.1)
        raise AlignError(f"MLflow experiment {name!r} could not be made in {self.uri}: check the tracking store")

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # heavy: only when a run reports to MLflow

        items = [Param(key, value if isinstance(value, str) else json.dumps(value)) for key, value in params.items()]
        for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[lo:lo + 100])

    def held(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            if steps:
                held[key] = max(steps)
        return held

    def key(self, tag: str) -> str:
        return mlflow_key(tag)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # heavy: only when a run reports to MLflow

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(tag), value, now, step)
                                                    for tag, value in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_key(tag: str) -> str:
    """A tag as MLflow names a metric: it takes letters, digits, ``_-. :/`` only (``mean_R@1`` → ``mean_R_at_1``)."""
    return re.sub(r"[^\w.\- :/]", "_", tag.replace("@", "_at_"))


def _open_tracker(name: str, run_path: Path, group: str | None, config: dict[str, Any],
                  ids: dict[str, Any]) -> Tracker:
    """Tracker ``name``'s run for the run in ``run_path``, continued from ``ids`` (RUN/tracking.json, updated);
    a tracker that cannot open its run (a server configured but not reachable, ...) is one AlignError line."""
    try:
        if name == "tensorboard":
            return TensorBoardTracker(run_path / TENSORBOARD_DIR, flat_params(config))
        if name == "wandb":
            tracker = WandbTracker(run_path, run_path.name, group, config, ids.get("wandb", {}).get("id"))
            ids["wandb"] = {"id": tracker.id}
            return tracker
        mlflow = MlflowTracker(run_path.name, group, flat_params(config), ids.get("mlflow", {}))
        ids["mlflow"] = {"run_id": mlflow.run_id, "tracking_uri": mlflow.uri}
        return mlflow
    except AlignError:
        raise
    except Exception as exc:  # the trackers' own errors (network, store, settings) are many and unlike each other
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise AlignError(shorten(f"--report-to {name}: could not open the run's {name} run ({text[:160]}): check "
                                 f"its settings, or leave {name} out")) from exc


class RunTracking:
    """The trackers one run reports to, fed by its run directory: the records metrics.jsonl gets (``record``) and
    its results (``results``), each logged only into the trackers that do not hold its step yet."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self._held = [t.held() for t in trackers]
        self.last_step = 0

    @classmethod
    def open(cls, names: list[str], run_path: Path, group: str | None, config: dict[str, Any],
             records: list[dict[str, Any]]) -> "RunTracking":
        """Open (or continue) the run's tracker runs, named by its folder and grouped by ``group`` (a study's
        name), with ``config`` as hyper-parameters, and give them the ``records`` (metrics.jsonl) they lack."""
        ids_path = run_path / TRACKING_FILE
        ids = read_json(ids_path) if ids_path.is_file() else {}
        trackers: list[Tracker] = []
        try:
            for name in names:
                trackers.append(_open_tracker(name, run_path, group, config, ids))
            if any(n != "tensorboard" for n in names):
                write_json(ids_path, ids)
        except BaseException:
            for tracker in trackers:
                tracker.close(failed=True)
            raise
        tracking = cls(trackers)
        for record in records:
            tracking.record(record)
        return tracking

    def _log(self, values: dict[str, float], step: int) -> None:
        self.last_step = max(self.last_step, step)
        for tracker, held in zip(self.trackers, self._held):
            new = {tag: v for tag, v in values.items() if step > held.get(tracker.key(tag), tracker.floor)}
            if new:
                tracker.log(new, step)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        self._log(record_values(record), int(record["step"]))

    def results(self, results: dict[str, Any]) -> None:
        """A finished run's results, at its last step."""
        self._log(results_values(results), max(int(results.get("steps_done") or 0), self.last_step))

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


def write_hparams_summary(folder: Path, summary: list[dict[str, Any]], axes: Iterable[str]) -> Path:
    """A study's summary table (one row per optimizer: its best configuration and test means) as TensorBoard
    hyper-parameter/metric pairs: one run per optimizer in ``folder``/<optimizer>/, for TensorBoard's HParams view.
    The hyper-parameters take the cells' own names (``optim.name``, ``optim.lr``, ``optim.rho``, method axes), so
    the view filters the cells and the summary alike; writing it again replaces it."""
    from torch.utils.tensorboard import SummaryWriter  # heavy: only when a study reports to TensorBoard

    axes = list(axes)
    for row in summary:
        params = {"optim.name": row["optimizer"], "optim.lr": row.get("lr"), "optim.rho": row.get("rho"),
                  **{f"optim.{a}": row.get(a) for a in axes}}
        metrics = {f"summary/{k}": float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("lr", "rho", *axes)
                   and math.isfinite(float(v))}
        run = folder / row["optimizer"]
        for old in run.glob("events.out.tfevents.*") if run.is_dir() else []:
            old.unlink()  # the report written again replaces the table, never adds a second one
        with SummaryWriter(str(run)) as writer:
            # the session's hyper-parameters only: an experiment summary would hide the cells' from the HParams view
            writer.file_writer.add_summary(session_start(params))
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, 0)
    return folder
