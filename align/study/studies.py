"""The study folder (edge layer): ``StudyDir``, which owns what a study keeps on disk besides its report.

Layout of a study folder::

    STUDY/.lock            held by the one process that writes the study (``align compare``)
    STUDY/config.yaml      the study's resolved config, headed by the command that re-runs it
    STUDY/packs.json       the pack layout and threads per pack, fixed at the study's first run
    STUDY/runs/<cell key>/ one training run directory per cell (``align.train.run_dir.RunDir``)
    STUDY/results.csv ...  the report's files (``align.study.report``), written when every cell is finished
    STUDY/hparams/<optimizer>/  with --report-to tensorboard: the summary table for TensorBoard's HParams view

Under ``torchrun`` rank 0 holds the ``StudyDir`` and the other ranks its read-only twin (``StudyDir.for_rank``):
they read the same folder and write nothing.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ContextManager

from align.common import distributed, paths
from align.common.config import dump_config
from align.common.distributed import Rank
from align.common.errors import AlignError
from align.common.files import atomic_write_text, read_json, require_writable, wait_until_visible, write_json
from align.common.locks import LOCK_FILE, exclusive
from align.study import report
from align.study.cells import Cell
from align.study.stats import used_axes
from align.train import run_dir
from align.train.tracking import write_hparams_summary

CONFIG_FILE = paths.SAVED_CONFIG
PACKS_FILE = "packs.json"  # the study's pack layout and threads per pack, fixed at its first run
RUNS_FOLDER = "runs"  # one run directory per cell, named by the cell's key
HPARAMS_FOLDER = "hparams"  # with --report-to tensorboard: the summary table, a TensorBoard run per optimizer
STUDY_MARKS = (PACKS_FILE, RUNS_FOLDER, LOCK_FILE)  # what only a study folder holds beside its config.yaml
TEMP_PATTERNS = (".*.tmp", ".*.tmp.png")  # what a killed writer of the tables, report and plots leaves


def study_dir(cfg: Any) -> Path:
    """The folder of a study (an ``align.study.config.CompareConfig``): ``study_dir`` if set (relative: under the
    data root, never the working folder), else ``<data root>/studies/<name>``."""
    return paths.in_data_root(cfg.study_dir) if cfg.study_dir else paths.studies_dir() / cfg.name


def locate_study(config_path: str | Path, cfg: Any, chosen: bool = False) -> Any:
    """``cfg`` (a ``CompareConfig``) with the folder ``align compare --config config_path`` continues: a study's own
    config.yaml names the folder it sits in, so a copied or moved study folder continues where it is, unless the
    command line ``chosen`` one (--out, --set study_dir=...). Under torchrun rank 0 looks, every rank hears."""
    folder = None if chosen else distributed.from_main(lambda: paths.saved_config_folder(config_path, STUDY_MARKS))
    if folder is None or os.path.abspath(study_dir(cfg)) == str(folder):
        return cfg
    return cfg.model_copy(update={"study_dir": paths.relative_to_data_root(folder)})


class StudyDir:
    """A study folder's bookkeeping for ``align compare``: what it holds, and every write to it but the cells'
    (their runs write their own folders)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_rank(cls, path: str | Path, job: Rank) -> StudyDir:
        """The handle rank ``job`` holds: the writer on rank 0 (or in a single process), else the read-only twin."""
        return cls(path) if job.is_main else ReadOnlyStudyDir(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def packs_path(self) -> Path:
        return self.path / PACKS_FILE

    @property
    def runs_path(self) -> Path:
        return self.path / RUNS_FOLDER

    def check_writable(self) -> None:
        """AlignError (one line) unless the study folder can be written: checked before any work, leaving nothing
        behind (``align.common.files.require_writable``)."""
        require_writable(self.path, "study folder", "use --out NEW_DIR, or set ALIGN_HOME")

    def lock(self) -> ContextManager[Any]:
        """Context manager: this process is the study's only writer (AlignError naming the holder)."""
        return exclusive(self.path, "study", "another align compare is running it; wait for it to finish or use "
                                             "--out NEW_DIR")

    def clear_temp_files(self) -> list[Path]:
        """Remove the temporary files a killed study left in its folder (tables, report, plots); returns them.
        Only call it holding the study's lock: then no other process is writing them."""
        stale = [p for pattern in TEMP_PATTERNS for p in self.path.glob(pattern)]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def write_config(self, cfg: Any) -> Path:
        """The study's resolved config (its ``CompareConfig``) as config.yaml, headed by the command that runs it
        again. It names the folder as STUDY, not by its path: a copied or moved study folder continues where it
        is, so the command stays true there too."""
        atomic_write_text(self.config_path, f"# align compare --config STUDY/{CONFIG_FILE}   (finish this study or "
                                            "write its report again; STUDY: this folder, wherever it is)\n"
                          + dump_config(cfg))
        return self.config_path

    def read_pack_layout(self) -> dict[str, Any] | None:
        """packs.json as {"threads": int, "packs": [[cell key, ...], ...]}, or None when there is none;
        AlignError (one line) when it is damaged."""
        if not self.packs_path.is_file():
            return None
        layout = read_json(self.packs_path)
        ok = isinstance(layout, dict) and isinstance(layout.get("threads"), int) and layout["threads"] >= 1 \
            and isinstance(layout.get("packs"), list) \
            and all(isinstance(p, list) and p and all(isinstance(k, str) for k in p) for p in layout["packs"])
        keys = [k for p in layout["packs"] for k in p] if ok else []
        if not ok or len(keys) != len(set(keys)):
            raise AlignError(f"{self.packs_path} is damaged (not a pack layout): delete it to plan the packs again "
                             "(resumed cells may then differ from an uninterrupted run in the last bits)")
        return layout

    def write_pack_layout(self, layout: dict[str, Any]) -> None:
        """Write packs.json (atomically)."""
        write_json(self.packs_path, layout)

    def run_path(self, cell: Cell) -> Path:
        """The run directory of ``cell``."""
        return self.runs_path / cell.key

    def run(self, cell: Cell) -> run_dir.RunDir:
        """The run directory of ``cell``, to read (its training writes it through its own handle)."""
        return run_dir.RunDir(self.run_path(cell))

    def unfinished(self, cells: list[Cell]) -> list[Cell]:
        """The cells of ``cells`` whose runs have not written their results yet, in the order given."""
        return [c for c in cells if not self.run(c).is_finished()]

    def wait_for_results(self, cells: list[Cell]) -> None:
        """Wait until the results of ``cells`` show here: other ranks wrote them, on a file system that may show
        them late (AlignError naming one that never shows)."""
        wait_until_visible([self.run(c).results_path for c in cells], "cell results")

    def rows(self, cells: list[Cell]) -> list[dict[str, Any]]:
        """One results.csv row per finished cell of ``cells``, in their order (deterministic: no timings)."""
        return [result_row(c, run.read_results()) for c in cells if (run := self.run(c)).is_finished()]

    @property
    def hparams_path(self) -> Path:
        return self.path / HPARAMS_FOLDER

    def write_report(self, cfg: Any, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """results.csv, the tables, plots and report.md of ``rows`` (``align.study.report``) → what was computed;
        with ``report_to`` naming tensorboard, the summary table for TensorBoard's HParams view too."""
        written = report.write_report(self.path, cfg, rows, self.runs_path)
        if "tensorboard" in cfg.report_to:
            write_hparams_summary(self.hparams_path, written["summary"], used_axes(rows))
        return written


class ReadOnlyStudyDir(StudyDir):
    """A study folder as the ranks other than 0 of a torchrun job see it: they read what rank 0 wrote (the cells'
    results) and write nothing, not even its lock."""

    def lock(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def clear_temp_files(self) -> list[Path]:
        return []

    def write_config(self, cfg: Any) -> Path:
        return self.config_path

    def write_pack_layout(self, layout: dict[str, Any]) -> None:
        pass

    def write_report(self, cfg: Any, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        return None


def result_row(cell: Cell, results: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run's results.json into a results.csv row (method-axis values, if any, after ρ; the head's
    rescaling, where the grid has that axis, before the seed)."""
    row: dict[str, Any] = {"run": cell.key, "optimizer": cell.optimizer, "lr": cell.lr, "rho": cell.rho,
                           **dict(cell.method), **({} if cell.rescale is None else {"rescale": cell.rescale}),
                           "seed": cell.seed,
                           "status": "ok" if results.get("status") == "done" else "diverged",
                           "diverged_at": results.get("diverged_at"), "steps_done": results.get("steps_done"),
                           "best_step": results.get("best_step"),
                           # absent from results written before they were recorded: blank in results.csv
                           "uniform_plateau_steps": results.get("uniform_plateau_steps"),
                           "collapsed": results.get("collapsed")}
    for prefix in ("best_test", "final_test", "best_val", "max_val"):
        for key, value in (results.get(prefix) or {}).items():
            row[f"{prefix}_{key}"] = value
    row["loss_at_step"] = results.get("loss_at_step")
    row["final_loss"] = results.get("final_loss")
    for key, value in ((results.get("sharpness") or {}).get("best") or {}).items():
        row[f"sharpness_{key}"] = value
    return row
