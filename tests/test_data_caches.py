"""`data: {caches: {train: NAME, val: NAME, test: NAME}}` in train and study configs: finished caches named per split
(by `align cache import`'s name, a key, a unique key prefix or a folder) instead of the embed settings. A run on
imported caches equals the run on the same arrays in an embed cache; an embed-section config keeps its hash."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cache.importing import import_cache, open_source
from align.cache.key import CachesConfig, split_folder
from align.common.config import load_config, validate
from align.common.errors import AlignError
from align.cli.main import app
from align.train.config import TrainConfig, hashed_config, pack_key
from align.train.identity import config_hash
from faults import one_error_line
from helpers import SIZES, make_cache, train_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """helpers.make_cache's three splits as an embed cache, and the same arrays imported under the name synth."""
    root = tmp_path_factory.mktemp("caches")
    embedded = make_cache(root / "embedded")
    for split in SIZES:
        folder = split_folder(validate(TrainConfig, train_config(embedded)).data, split)
        source = open_source(None, folder / "image.npy", folder / "text.npy", folder / "caption_to_image.npy")
        import_cache(source, "synth", split, {"image": "test:image", "text": "test:text"}, root / "imported",
                     progress=False, log=lambda m: None)
    return {"embedded": embedded, "imported": root / "imported", "root": root}


def caches_section(root: Path, **entries: str) -> dict:
    return {"caches": {"train": "synth", "val": "synth", "test": "synth", **entries}, "cache_root": str(root)}


SHORT = {"schedule": {"steps": 30, "batch_size": 64, "warmup_steps": 5}, "eval": {"every": 10}, "checkpoint_every": 10,
         "loss_at_step": 20}


def test_a_run_on_imported_caches_equals_the_run_on_the_same_arrays_in_an_embed_cache(caches, tmp_path):
    runs = {}
    for form, data in (("embed", caches["embedded"]), ("caches", caches_section(caches["imported"]))):
        config = tmp_path / f"{form}.yaml"
        config.write_text(yaml.safe_dump(train_config(data, **SHORT)))
        runs[form] = tmp_path / f"run-{form}"
        result = runner.invoke(app, ["train", "--config", str(config), "--out", str(runs[form]), "--no-progress"])
        assert result.exit_code == 0, result.output
    for name in ("checkpoints/best.safetensors", "checkpoints/step-0000030.safetensors", "metrics.jsonl"):
        assert (runs["embed"] / name).read_bytes() == (runs["caches"] / name).read_bytes(), name
    results = {form: json.loads((run / "results.json").read_text()) for form, run in runs.items()}
    for section in ("best_val", "best_test", "final_test"):
        assert results["caches"][section] == results["embed"][section], section
    evaluated = {}
    for form, run in runs.items():  # align eval from disk: the imported run reads its caches through data.caches
        result = runner.invoke(app, ["eval", str(run), "--split", "test"])
        assert result.exit_code == 0, result.output
        evaluated[form] = json.loads((run / "eval" / "test-best.json").read_text())["metrics"]
    assert evaluated["caches"] == evaluated["embed"]
    line = one_error_line(runner.invoke(app, ["eval", str(runs["caches"]), "--split", "test", "--gallery",
                                              str(tmp_path / "g.png")]))
    assert "no gallery for test: its cache names no dataset to read the images from" in line  # before the work
    test_cache = next(p for p in caches["imported"].iterdir() if p.name.startswith("synth-test-"))
    other = runner.invoke(app, ["eval", str(runs["caches"]), "--cache", str(test_cache)])  # encoders: manifests'
    assert other.exit_code == 0, other.output
    assert json.loads((runs["caches"] / "eval" / f"cache-{test_cache.name}-best.json").read_text())["metrics"] \
        == evaluated["caches"]
    assert evaluated["caches"]["mean_R@1"] == results["caches"]["best_test"]["mean_R@1"] > 0.1  # it learned


def test_an_entry_is_a_name_a_key_a_key_prefix_or_a_folder(caches):
    imported = caches["imported"]
    folder = next(p for p in imported.iterdir() if p.name.startswith("synth-val-"))
    for entry in ("synth", folder.name, folder.name[:14], str(folder)):
        data = CachesConfig(caches={"val": entry}, cache_root=str(imported))
        assert split_folder(data, "val") == folder, entry


def test_a_missing_imported_cache_is_one_line_naming_align_cache_import(caches, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(caches_section(caches["imported"], val="nosuch"), **SHORT)))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run"),
                                              "--no-progress"]), after_progress=True)
    assert (f"data.caches.val: no cache 'nosuch' for split 'val' under {caches['imported']}: make it with `align "
            f"cache import SOURCE --name nosuch --split val --root {caches['imported']}`") in line


def test_a_name_imported_for_another_split_only_is_said_not_used(caches):
    data = CachesConfig(caches={"val": "synth"}, cache_root=str(caches["imported"]))
    data_other = data.model_copy(update={"caches": {"dev": "synth"}})
    with pytest.raises(AlignError, match=r"no cache 'synth' for split 'dev' under .* \(synth has split test, train, "
                                         r"val only\): make it with `align cache import"):
        split_folder(data_other, "dev")


def test_a_prefix_of_several_caches_is_refused_naming_them(caches):
    data = CachesConfig(caches={"val": "synth-"}, cache_root=str(caches["imported"]))
    with pytest.raises(AlignError, match=r"data.caches.val: 'synth-' matches 3 caches under .*: give its key"):
        split_folder(data, "val")


def test_a_name_is_never_taken_as_a_prefix_of_another_name(caches):
    data = CachesConfig(caches={"val": "synt"}, cache_root=str(caches["imported"]))  # synth-val-… is not synt's
    with pytest.raises(AlignError, match=r"data.caches.val: no cache 'synt' for split 'val'"):
        split_folder(data, "val")


@pytest.mark.parametrize("data, says", [
    ({"caches": {"train": "a", "val": "a", "test": "a"}, "dataset": {"kind": "synthetic"}},
     "give either caches: (finished caches by name, key or folder) or the embed settings (dataset, ...), not both"),
    ({"cache_root": "/x"}, "give the embed settings (dataset, image_encoder, text_encoder) or caches: {train: NAME"),
    ({"caches": {"train": "a", "test": "a"}}, "data.caches has no 'val' entry, which eval.split needs: add "
                                              "data.caches.val: NAME, or validate on eval.holdout_images"),
    ({"caches": {"val": "a", "test": "a"}}, "data.caches has no 'train' entry, which training needs"),
    ({"caches": {"train": "a", "val": "a", "test": ""}}, "data.caches: Value error, caches.test is empty"),
    ({"caches": {"train": 3, "val": "a", "test": "a"}}, "data.caches.train: Input should be a valid string"),
    ({"caches": {"train": "a", "val": "a", "test": "a"}, "cache_rot": "/x"},
     "unknown key 'data.cache_rot' (did you mean 'cache_root'?); valid keys here: cache_root, caches"),
])
def test_a_data_section_of_neither_or_both_forms_is_one_line(tmp_path, data, says):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(data)))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert says in line, line
    assert not (tmp_path / "run").exists()


def test_an_embed_section_still_names_its_unknown_keys_without_the_union_in_the_path(tmp_path):
    data = dict(make_cache(tmp_path), batchsize=3)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(data)))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert "unknown key 'data.batchsize' (did you mean 'batch_size'?); valid keys here: batch_size, cache_root" in line


def test_align_embed_of_a_config_naming_caches_says_there_is_nothing_to_embed(caches, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(caches_section(caches["imported"]))))
    line = one_error_line(runner.invoke(app, ["embed", "--config", str(config), "--no-progress"]))
    assert "names finished caches (data.caches), so there is nothing to embed: `align cache import`" in line


def _study(tmp_path: Path, data: dict) -> Path:
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(dict(
        train_config(data, schedule={"steps": 12, "batch_size": 32, "warmup_steps": 2}, checkpoint_every=6,
                     loss_at_step=6, eval={"every": 6, "sharpness": False, "knn_k": 4}),
        name="named", study_dir=str(tmp_path / "study"), workers=1, reference="sam",
        grid={"optimizers": ["sam", "adamw"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})))
    return config


def test_compare_dry_run_and_a_study_on_imported_caches(caches, tmp_path):
    config = _study(tmp_path, caches_section(caches["imported"]))
    plan = runner.invoke(app, ["compare", "--config", str(config), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    planned = json.loads(plan.output)
    assert {s: Path(p).name[:10] for s, p in planned["caches"].items()} == {
        "train": "synth-trai", "val": "synth-val-", "test": "synth-test"}
    assert planned["image_encoder"] == "test:image" and planned["runs"] == 2
    assert not (tmp_path / "study").exists()
    result = runner.invoke(app, ["compare", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "study" / "report.md").read_text()
    assert "Data: caches test `synth`, train `synth`, val `synth`. Head `linear`" in report  # the config's order
    assert len((tmp_path / "study" / "results.csv").read_text().splitlines()) == 3


def test_compare_refuses_a_missing_cache_before_writing_anything(caches, tmp_path):
    config = _study(tmp_path, caches_section(caches["imported"], test="gone"))
    for extra in (["--dry-run"], ["--no-progress"]):
        line = one_error_line(runner.invoke(app, ["compare", "--config", str(config), *extra]))
        assert "data.caches.test: no cache 'gone' for split 'test'" in line and "`align cache import" in line
        assert not (tmp_path / "study").exists()


def test_eval_gallery_of_an_imported_cache_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("i", "t"):  # one width: a raw gallery would have a shared space
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((12, 8)).astype(np.float32))
    folder, _ = import_cache(open_source(None, tmp_path / "i.npy", tmp_path / "t.npy", None), "pics", "test",
                             {"image": "a", "text": "b"}, tmp_path / "cache", progress=False, log=lambda m: None)
    line = one_error_line(runner.invoke(app, ["eval", "--cache", str(folder), "--gallery", str(tmp_path / "g.png")]))
    assert f"no gallery for cache {folder.name}: its cache names no dataset to read the images from" in line
    assert not (tmp_path / "g.png").exists()


# Measured on the code before data.caches existed (commit 9fd8b2e), ALIGN_HOME=/fixed/home: the hash a checkpoint
# must match, and the pack key, of the packaged configs (for a study: its first cell).
HASHES = {"train/synthetic_msam.yaml": ("ddb14f4e5eca65b0", "366808b7b0c513e1"),
          "compare/default.yaml": ("58f0a5a016bb788a", "f821a193ff6055b3"),
          "compare/mnist_offline.yaml": ("c9bd461d3815a4a1", "3e04171d1f9300b2")}


@pytest.mark.parametrize("name", list(HASHES))
def test_embed_section_configs_keep_their_config_hash(name, monkeypatch):
    from align.study.config import CompareConfig, cell_config, grid_cells

    monkeypatch.setenv("ALIGN_HOME", "/fixed/home")
    if name.startswith("train/"):
        cfg = load_config(TrainConfig, REPO / "configs" / name)
    else:
        study = load_config(CompareConfig, REPO / "configs" / name)
        cfg = cell_config(study, grid_cells(study.grid)[0], Path("/fixed/home/studies/x/runs/c0"))
    assert (config_hash(hashed_config(cfg)), pack_key(cfg)) == HASHES[name]


def test_a_caches_config_round_trips_through_its_saved_yaml(caches):
    cfg = validate(TrainConfig, train_config(caches_section(caches["imported"])))
    assert isinstance(cfg.data, CachesConfig) and cfg.data.splits == ["train", "val", "test"]
    again = validate(TrainConfig, yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg and config_hash(hashed_config(again)) == config_hash(hashed_config(cfg))
    assert np.array_equal(np.load(split_folder(cfg.data, "val") / "image.npy"),
                          np.load(split_folder(validate(TrainConfig, train_config(caches["embedded"])).data, "val")
                                  / "image.npy"))
