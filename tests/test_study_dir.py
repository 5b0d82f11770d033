"""The study folder's handle (``StudyDir``) and its read-only twin, on hand-made folders: what it reads, what it
writes, and that the twin the ranks other than 0 hold writes nothing."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from align.common.distributed import Rank
from align.common.errors import AlignError
from align.study.cells import Cell
from align.study.config import CompareConfig
from align.study.studies import ReadOnlyStudyDir, StudyDir

DATA = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
        "text_encoder": {"backend": "open_clip", "model": "ViT-S-32"}}
SGD, SAM = Cell("sgd", 0.1, None, 0), Cell("sam", 0.01, 0.05, 1, (("eta", 10.0),))


def finish(study: StudyDir, cell: Cell, results: dict) -> None:
    """A cell's run as its training leaves it: results.json in its run folder."""
    folder = study.path / "runs" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_for_rank_gives_rank_zero_the_writer_and_the_others_the_twin(tmp_path):
    assert type(StudyDir.for_rank(tmp_path, Rank(0, 2))) is StudyDir
    assert type(StudyDir.for_rank(tmp_path, Rank())) is StudyDir  # a single process
    assert type(StudyDir.for_rank(tmp_path, Rank(1, 2, 1))) is ReadOnlyStudyDir


def test_cells_live_in_runs_and_rows_come_from_the_finished_ones_in_the_order_asked(tmp_path):
    study = StudyDir(tmp_path)
    assert study.run_path(SAM) == tmp_path / "runs" / "sam_lr0.01_rho0.05_eta10_s1"
    finish(study, SAM, {"status": "done", "steps_done": 40, "best_step": 30, "best_test": {"mean_R@1": 0.25},
                        "sharpness": {"best": {"max_eig": 3.5}}, "final_loss": 1.5})
    (tmp_path / "runs" / SGD.key).mkdir()  # started, not finished
    assert study.unfinished([SGD, SAM]) == [SGD]
    assert study.rows([SGD, SAM]) == [{
        "run": "sam_lr0.01_rho0.05_eta10_s1", "optimizer": "sam", "lr": 0.01, "rho": 0.05, "eta": 10.0, "seed": 1,
        "status": "ok", "diverged_at": None, "steps_done": 40, "best_step": 30,
        "uniform_plateau_steps": None, "collapsed": None, "best_test_mean_R@1": 0.25,
        "loss_at_step": None, "final_loss": 1.5, "sharpness_max_eig": 3.5}]
    finish(study, SGD, {"status": "diverged", "diverged_at": 7})
    assert [(r["run"], r["status"], r["diverged_at"]) for r in study.rows([SAM, SGD])] == [
        (SAM.key, "ok", None), (SGD.key, "diverged", 7)]


def test_the_pack_layout_round_trips_and_a_damaged_one_is_one_line(tmp_path):
    study = StudyDir(tmp_path)
    assert study.read_pack_layout() is None
    layout = {"threads": 2, "packs": [[SAM.key], [SGD.key]]}
    study.write_pack_layout(layout)
    assert json.loads((tmp_path / "packs.json").read_text()) == layout == study.read_pack_layout()
    for damaged in ({"threads": 0, "packs": [["a"]]}, {"threads": 1, "packs": [["a"], ["a"]]},
                    {"threads": 1, "packs": [[]]}, [1, 2]):
        (tmp_path / "packs.json").write_text(json.dumps(damaged))
        with pytest.raises(AlignError, match=r"packs.json is damaged \(not a pack layout\): delete it") as info:
            study.read_pack_layout()
        assert "\n" not in str(info.value)


def test_the_writer_cleans_a_killed_runs_temporary_files_and_writes_its_config(tmp_path):
    cfg = CompareConfig.model_validate({"data": DATA, "name": "s", "study_dir": str(tmp_path),
                                        "grid": {"optimizers": ["sam"]}})
    study = StudyDir(tmp_path)
    stale = [tmp_path / ".summary.csv.123.tmp", tmp_path / ".plot.123.tmp.png"]
    for path in [*stale, tmp_path / "summary.csv"]:
        path.write_text("x")
    assert sorted(study.clear_temp_files()) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    path = study.write_config(cfg)
    text = path.read_text()
    assert path == tmp_path / "config.yaml" and text.startswith("# align compare --config STUDY/config.yaml   (")
    assert CompareConfig.model_validate(yaml.safe_load(text)) == cfg
    with study.lock():
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_the_twin_reads_what_rank_zero_wrote_and_writes_nothing(tmp_path):
    cfg = CompareConfig.model_validate({"data": DATA, "name": "s", "study_dir": str(tmp_path),
                                        "grid": {"optimizers": ["sam"]}})
    writer, twin = StudyDir(tmp_path), ReadOnlyStudyDir(tmp_path)
    writer.write_pack_layout({"threads": 1, "packs": [[SGD.key]]})
    finish(writer, SGD, {"status": "done"})
    (tmp_path / ".report.md.1.tmp").write_text("x")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with twin.lock():
        assert twin.clear_temp_files() == []
        twin.write_config(cfg)
        twin.write_pack_layout({"threads": 9, "packs": [["other"]]})
        assert twin.write_report(cfg, twin.rows([SGD])) is None
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert twin.read_pack_layout() == {"threads": 1, "packs": [[SGD.key]]}
    assert [r["run"] for r in twin.rows([SGD, SAM])] == [SGD.key] and twin.unfinished([SGD, SAM]) == [SAM]
