"""`data_from:` in train and compare configs: the named embed config's settings become the `data:` section, as if
copied in (same validated config, same saved config.yaml, same cache keys, same run), and every misuse is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cache.key import EmbedConfig, cache_key, load_embed_config
from align.cli.main import app
from align.common.config import dump_config, load_config, load_yaml, read_config
from align.common.errors import AlignError
from align.study.config import CompareConfig
from align.train.config import TrainConfig
from helpers import make_cache, save_tiny_clip, train_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

# The packaged configs that name their data section, with the embed config each one names.
REFERENCES = {"train/synthetic_msam": "embed/synthetic_offline", "compare/default": "embed/synthetic_offline",
              "compare/mnist_offline": "embed/mnist_offline"}
MODELS = {"train": TrainConfig, "compare": CompareConfig}


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def without_wall_time(record: dict) -> dict:
    """A run's JSON record without its wall-clock times (they differ between any two runs)."""
    record = {k: v for k, v in record.items() if k != "wall_time_s"}
    if isinstance(record.get("train_state"), dict):
        record["train_state"] = without_wall_time(record["train_state"])
    return record


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory: relative paths resolve against the config's folder, never against this one."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def embed_file(tmp_path) -> Path:
    """A small embed config in its own folder (data/embed.yaml)."""
    data = {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 40, "val_images": 10, "test_images": 10}},
            "splits": ["train", "test"], "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}, "batch_size": 16,
            "cache_root": str(tmp_path / "cache"), "device": "cpu"}
    return write_yaml(tmp_path / "data" / "embed.yaml", data)


# -- the packaged configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_packaged_references_resolve_to_the_embed_file_exactly(name, elsewhere):
    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["data_from"] == REFERENCES[name] and "data" not in raw  # the file names its data, holds no copy
    target = yaml.safe_load((CONFIGS / f"{REFERENCES[name]}.yaml").read_text())
    resolved = read_config(path)
    assert resolved["data"] == target and "data_from" not in resolved
    assert {k: v for k, v in resolved.items() if k != "data"} == {k: v for k, v in raw.items() if k != "data_from"}
    # Validated, it is the config one gets by pasting the embed file under data: (what the files held before).
    pasted = {("data" if k == "data_from" else k): (target if k == "data_from" else v) for k, v in raw.items()}
    model = MODELS[name.split("/")[0]]
    assert load_config(model, path) == model.model_validate(pasted)
    embed = EmbedConfig.model_validate(target)
    assert load_embed_config(path) == embed  # `align embed --config <this file>` fills the embed file's caches
    assert [cache_key(load_embed_config(path), s) for s in embed.splits] == [cache_key(embed, s) for s in embed.splits]


def test_every_config_with_a_data_section_either_references_or_differs_from_every_embed_file():
    """No packaged train or compare config holds a verbatim copy of an embed config (it would use data_from)."""
    embeds = [yaml.safe_load(p.read_text()) for p in sorted((CONFIGS / "embed").glob("*.yaml"))]
    for path in sorted([*(CONFIGS / "train").glob("*.yaml"), *(CONFIGS / "compare").glob("*.yaml")]):
        raw = yaml.safe_load(path.read_text())
        assert ("data" in raw) != ("data_from" in raw), path
        assert raw.get("data") not in embeds, f"{path} copies an embed config: use data_from"


# -- how a reference is found ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["embed/synthetic_offline", "synthetic_offline", "configs/embed/synthetic_offline.yaml"])
def test_a_packaged_name_resolves_from_any_folder(value, elsewhere, tmp_path):
    path = write_yaml(tmp_path / "runs" / "t.yaml", {"data_from": value})
    assert read_config(path)["data"] == yaml.safe_load((CONFIGS / "embed" / "synthetic_offline.yaml").read_text())


def test_relative_paths_resolve_against_the_referencing_files_folder(embed_file, elsewhere, tmp_path):
    target = yaml.safe_load(embed_file.read_text())
    nested = write_yaml(tmp_path / "data" / "train" / "t.yaml", {"data_from": "../embed.yaml"})
    beside = write_yaml(tmp_path / "data" / "t.yaml", {"data_from": "embed.yaml"})
    absolute = write_yaml(tmp_path / "other" / "t.yaml", {"data_from": str(embed_file)})
    for path in (nested, beside, absolute):
        assert read_config(path)["data"] == target
    # A path relative to the working directory is not one relative to the file.
    write_yaml(elsewhere / "embed.yaml", target)
    with pytest.raises(AlignError, match="no such file"):
        read_config(write_yaml(tmp_path / "other" / "u.yaml", {"data_from": "embed.yaml"}))


def test_a_file_beside_the_config_wins_over_a_packaged_name(tmp_path, elsewhere):
    mine = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "minilm"},
            "text_encoder": {"backend": "minilm"}}
    write_yaml(tmp_path / "embed" / "synthetic_offline", mine)
    assert read_config(write_yaml(tmp_path / "t.yaml", {"data_from": "embed/synthetic_offline"}))["data"] == mine


# -- overrides, and the saved config ----------------------------------------------------------------------------

def test_set_overrides_apply_on_top_of_the_referenced_section(embed_file, tmp_path):
    path = write_yaml(tmp_path / "t.yaml", {"data_from": "data/embed.yaml", "head": {"out_dim": 8}})
    cfg = load_config(TrainConfig, path, ["data.batch_size=32", "data.dataset.synthetic.test_images=20"])
    target = yaml.safe_load(embed_file.read_text())
    assert cfg.data.batch_size == 32 and target["batch_size"] == 16
    assert cfg.data.dataset.synthetic.test_images == 20 and cfg.data.dataset.synthetic.train_images == 40
    assert cfg.data.splits == ["train", "test"] and cfg.head.out_dim == 8
    embed = load_embed_config(path, ["data.batch_size=32"])
    assert embed.batch_size == 32 and embed.cache_root == target["cache_root"]
    with pytest.raises(AlignError, match="use --set data.batch_size"):  # as for a copied data: section
        load_embed_config(path, ["batch_size=32"])
    assert load_yaml(embed_file) == target  # the embed file itself is never touched


def test_the_saved_config_holds_the_full_data_section(embed_file, tmp_path):
    path = write_yaml(tmp_path / "t.yaml", {"data_from": "data/embed.yaml"})
    saved = yaml.safe_load(dump_config(load_config(TrainConfig, path)))
    assert "data_from" not in saved
    assert saved["data"] == EmbedConfig.model_validate(yaml.safe_load(embed_file.read_text())).model_dump(mode="json")


def test_a_run_from_a_reference_is_the_run_from_the_copied_section(tmp_path):
    """Same config.yaml, checkpoints, metrics and results as the config with data: pasted in; its config.yaml holds
    the data and re-runs (--resume) without the reference."""
    data = make_cache(tmp_path / "cache")
    write_yaml(tmp_path / "data" / "embed.yaml", data)
    copied = train_config(data, schedule={"steps": 20}, eval={"every": 10, "sharpness": False}, checkpoint_every=10)
    referenced = {"data_from": "data/embed.yaml", **{k: v for k, v in copied.items() if k != "data"}}
    runs = {}
    for name, cfg in (("copied", copied), ("referenced", referenced)):
        runs[name] = tmp_path / "runs" / name
        result = runner.invoke(app, ["train", "--config", str(write_yaml(tmp_path / f"{name}.yaml", cfg)),
                                     "--out", str(runs[name]), "--no-progress"])
        assert result.exit_code == 0, result.output
    files = {name: {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
             for name, run in runs.items()}
    assert sorted(files["copied"]) == sorted(files["referenced"])
    assert {"checkpoints/step-0000010.safetensors", "metrics.jsonl", "results.json"} <= set(files["copied"])
    for name, copied_bytes in files["copied"].items():
        if name.endswith(".json"):  # the same but for the clock
            a, b = (without_wall_time(json.loads(files[run][name])) for run in ("copied", "referenced"))
            assert a == b, name
        elif name != "config.yaml":  # weights, metrics.jsonl
            assert copied_bytes == files["referenced"][name], name
    saved = {name: yaml.safe_load(files[name]["config.yaml"]) for name in files}
    assert saved["copied"] == {**saved["referenced"], "out_dir": saved["copied"]["out_dir"]}
    assert "data_from" not in saved["referenced"] and saved["referenced"]["data"]["cache_root"] == data["cache_root"]
    again = runner.invoke(app, ["train", "--config", str(runs["referenced"] / "config.yaml"), "--resume",
                                "--no-progress"])
    assert again.exit_code == 0, again.output


# -- misuse: one line each ---------------------------------------------------------------------------------------

def test_data_and_data_from_together_are_refused(embed_file, tmp_path):
    path = write_yaml(tmp_path / "t.yaml", {"data_from": "data/embed.yaml", "data": {"batch_size": 8}})
    with pytest.raises(AlignError, match="either data: or data_from:, not both"):
        read_config(path)


@pytest.mark.parametrize("value, expected", [
    ("nope", "no such file"),
    ("embed/nope", "no such file"),
    ("data/missing.yaml", "no such file"),
    (3, "data_from must name an embed config"),
    (None, "data_from must name an embed config"),
    ("train/flickr30k_vitb32_msam", "is a train or compare config"),
    ("compare/default", "uses data_from itself"),
    ("train/synthetic_msam", "uses data_from itself"),
    ("datasets/synthetic", "is not an embed config"),
])
def test_a_missing_or_wrong_kind_target_is_named(value, expected, embed_file, tmp_path):
    path = write_yaml(tmp_path / "t.yaml", {"data_from": value})
    with pytest.raises(AlignError, match=expected) as info:
        read_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and str(value) in message
    if expected == "no such file":
        assert "synthetic_offline" in message  # the packaged embed configs are offered


def test_chains_and_cycles_are_refused(embed_file, tmp_path):
    write_yaml(tmp_path / "a.yaml", {"data_from": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"data_from": "a.yaml"})
    write_yaml(tmp_path / "chain.yaml", {"data_from": "data/embed.yaml", "head": {"out_dim": 8}})
    for name, target in (("a.yaml", "b.yaml"), ("self.yaml", "self.yaml"), ("c.yaml", "chain.yaml")):
        path = tmp_path / name
        if not path.exists():
            write_yaml(path, {"data_from": target})
        with pytest.raises(AlignError, match="uses data_from itself"):
            read_config(path)


def test_the_commands_report_a_bad_reference_in_one_line_exit_2(embed_file, tmp_path):
    missing = write_yaml(tmp_path / "missing.yaml", {"data_from": "embed/nope"})
    both = write_yaml(tmp_path / "both.yaml", {"data_from": "data/embed.yaml", "data": {"batch_size": 8}})
    wrong = write_yaml(tmp_path / "wrong.yaml", {"data_from": "compare/coco_vitb32"})
    for path, expected in ((missing, "embed/nope"), (both, "not both"), (wrong, "train or compare config")):
        for command in (["train", "--out", str(tmp_path / "run")], ["compare", "--dry-run"], ["embed"]):
            line = one_error_line(runner.invoke(app, [*command, "--config", str(path)], env={"COLUMNS": "400"}))
            assert expected in line, (command, line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_packaged_compare_configs_dry_run_through_their_reference(elsewhere):
    for name, runs in (("default", 225), ("mnist_offline", 195)):  # the default also has GSAM and Friendly SAM
        result = runner.invoke(app, ["compare", "--config", name, "--dry-run"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["runs"] == runs


@pytest.mark.slow
def test_a_study_from_a_reference_is_the_study_from_the_copied_section(tmp_path):
    """results.csv byte for byte, one set of caches for both, and the study's config.yaml holds the full data."""
    (tmp_path / "tiny-clip").mkdir()
    encoder = {"backend": "open_clip", "model": f"local-dir:{save_tiny_clip(tmp_path / 'tiny-clip', seed=0)}"}
    data = {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 24, "val_images": 8, "test_images": 8,
                                                           "image_size": 32, "captions_per_image": 2}},
            "image_encoder": encoder, "text_encoder": encoder, "batch_size": 8, "device": "cpu",
            "cache_root": str(tmp_path / "cache")}
    write_yaml(tmp_path / "data" / "embed.yaml", data)
    shared = {"name": "tiny", "workers": 1, "reference": "sam", "head": {"kind": "linear", "out_dim": 8},
              "schedule": {"steps": 16, "batch_size": 8, "warmup_steps": 2},
              "eval": {"every": 8, "knn_k": 2, "ks": [1, 5], "sharpness": False},
              "loss_at_step": 8, "checkpoint_every": 8, "device": "cpu",
              "grid": {"optimizers": ["sam", "msam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1]}}
    studies = {"copied": {**shared, "data": data}, "referenced": {**shared, "data_from": "data/embed.yaml"}}
    for name, study in studies.items():
        study["study_dir"] = str(tmp_path / name)
        result = runner.invoke(app, ["compare", "--config", str(write_yaml(tmp_path / f"{name}.yaml", study)),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
    copied, referenced = tmp_path / "copied", tmp_path / "referenced"
    assert (copied / "results.csv").read_bytes() == (referenced / "results.csv").read_bytes()
    assert len((copied / "results.csv").read_text().splitlines()) == 1 + 4
    caches = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert caches == ["test", "train", "val"]  # the second study found the first one's caches: the same keys
    saved = {d: yaml.safe_load((d / "config.yaml").read_text()) for d in (copied, referenced)}
    assert "data_from" not in saved[referenced] and saved[referenced]["data"]["cache_root"] == data["cache_root"]
    assert {**saved[referenced], "study_dir": ""} == {**saved[copied], "study_dir": ""}
