"""Checkpoints and resume: SIGKILL mid-run then --resume reaches bit-identical weights; checkpoint files are
pickle-free and self-checking; a torn checkpoint falls back to the previous one."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from align.train import checkpoint, run_dir
from align.common.config import dump_config, validate
from helpers import make_cache, train_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def _same(a, b) -> bool:
    """Deep equality with tensors compared exactly (dtype, shape and every bit) and NaN == NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", ["adamw", "msam", "fsam", "gsam", "friendly_sam", "looksam", "lion"])
def test_optimizer_state_round_trips_through_safetensors_and_json(name, tmp_path):
    from safetensors.torch import load_file, save_file

    from align.optim import create_optimizer, optimizer_info

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    scale = torch.nn.Parameter(torch.tensor(2.0))
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1},
              {"params": [scale], "weight_decay": 0.0, "perturb": False}]
    two_pass = optimizer_info(name).two_pass
    kwargs = {"rho": 0.1, "base": "adamw"} if two_pass else {}
    opt = create_optimizer(name, groups, lr=0.1, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = (model(torch.ones(2, 4)) ** 2).sum() * scale
            loss.backward()
            return loss
        opt.step(closure) if two_pass else (closure(), opt.step())
        sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "odd": {3: (1.5, float("inf")), "s": None}}
    tensors: dict[str, torch.Tensor] = {}
    structure = checkpoint.flatten_state(state, "x", tensors)
    text = json.dumps(structure, allow_nan=False)  # strict JSON: no pickle, no NaN tokens
    save_file(tensors, tmp_path / "t.safetensors")
    back = checkpoint.unflatten_state(json.loads(text), load_file(tmp_path / "t.safetensors"))
    assert _same(back, state)
    assert isinstance(next(iter(back["optimizer"]["state"])), int)  # int keys survive JSON
    betas = back["optimizer"]["param_groups"][0]["betas"]
    assert betas == ((0.9, 0.99) if name == "lion" else (0.9, 0.999)) and isinstance(betas, tuple)  # stay tuples


def test_torn_or_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        run_dir.save_checkpoint(run, step, {"w": torch.full((3,), float(step))}, {"note": step}, keep=3)
    tensors, meta = run_dir.latest_checkpoint(run)
    assert meta["step"] == 20 and torch.equal(tensors["w"], torch.full((3,), 20.0))
    # Killed between the two writes of step 30: a new tensor file without its JSON is ignored.
    (run / "checkpoints" / "step-0000030.safetensors").write_bytes(b"partial")
    assert run_dir.latest_checkpoint(run)[1]["step"] == 20
    # A tensor file that no longer matches its JSON's hash is skipped, never loaded.
    (run / "checkpoints" / "step-0000020.safetensors").write_bytes(
        (run / "checkpoints" / "step-0000010.safetensors").read_bytes())
    assert run_dir.latest_checkpoint(run)[1]["step"] == 10
    # Only the newest `keep` complete checkpoints stay.
    for step in (40, 50, 60):
        run_dir.save_checkpoint(run, step, {"w": torch.zeros(1)}, {}, keep=2)
    assert run_dir.list_checkpoints(run) == [50, 60]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from align.train import run_dir
    from align.common.config import load_config
    from align.train.config import TrainConfig
    from align.train.loop import train

    cfg_path, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    original = run_dir.append_metrics

    def append_then_maybe_die(run, record):
        original(run, record)
        if record.get("kind") == "train" and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like a power cut

    run_dir.append_metrics = append_then_maybe_die
    train(load_config(TrainConfig, cfg_path), out, progress=False)
""")


@pytest.mark.parametrize("name", ["msam", pytest.param("adamw", marks=pytest.mark.slow), "gsam", "friendly_sam",
                                  "looksam", pytest.param("lion", marks=pytest.mark.slow)])
def test_sigkill_mid_run_then_resume_reaches_bit_identical_weights(name, tmp_path):
    from safetensors.torch import load_file

    from align.train.config import TrainConfig
    from align.train.loop import train
    from align.cli.main import app

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, optim={"name": name, "lr": 1e-2, "rho": 0.05, "base": "adamw"},
                                             schedule={"steps": 90}, eval={"every": 20, "sharpness": False},
                                             checkpoint_every=25))
    reference = tmp_path / "reference"
    expected = train(cfg, reference, progress=False)

    killed = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg.model_copy(update={"out_dir": str(killed)})))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))  # same as here
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg_file), str(killed), "63"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "results.json").exists()
    assert run_dir.list_checkpoints(killed) == [25, 50]  # killed 13 steps after the last checkpoint

    result = CliRunner().invoke(app, ["train", "--config", str(killed / "config.yaml"), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output

    ref = load_file(reference / "checkpoints" / "step-0000090.safetensors")
    got = load_file(killed / "checkpoints" / "step-0000090.safetensors")
    assert sorted(ref) == sorted(got)
    for key in ref:  # head, optimizer moments (incl. the base's), best head, RNG: every bit
        assert ref[key].dtype == got[key].dtype and torch.equal(ref[key], got[key]), key
    # The base's state is in the checkpoint: AdamW's step, exp_avg, exp_avg_sq for each of the 5 parameters (Lion's
    # exp_avg), and Friendly SAM's m or LookSAM's g_v for each of the 4 perturbed ones.
    own = {"friendly_sam": 4, "looksam": 4}.get(name, 0)
    assert len([k for k in ref if k.startswith("optim.")]) == (5 if name == "lion" else 15) + own
    # The metrics log reads as if the run had never stopped (steps 51..63 were re-logged once, not twice).
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    results = json.loads((killed / "results.json").read_text())
    expected_json = json.loads((reference / "results.json").read_text())
    for key in expected_json:
        if key != "wall_time_s":
            assert results[key] == expected_json[key], key
    assert expected["status"] == "done"


def test_a_uniform_plateau_across_a_sigkill_and_its_checkpoint_is_counted_whole_after_resume(tmp_path):
    """The plateau counters are loop state: a run on the plateau from its first step, killed 13 steps after its
    checkpoint at step 50, reports the 90-step stretch after --resume, not the 40 steps since the checkpoint."""
    from align.cli.main import app
    from align.train.config import TrainConfig

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05, "base": "adamw"},
                                             schedule={"steps": 90}, eval={"every": 20, "sharpness": False},
                                             checkpoint_every=25, uniform_plateau_tol=0.999))
    killed = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg.model_copy(update={"out_dir": str(killed)})))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg_file), str(killed), "63"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = json.loads((killed / "checkpoints" / "step-0000050.json").read_text())["train_state"]
    assert (saved["plateau"], saved["longest_plateau"]) == (50, 50)
    result = CliRunner().invoke(app, ["train", "--config", str(killed / "config.yaml"), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    uniform = math.log(cfg.schedule.batch_size)
    assert len(losses) == 90 and all(abs(v - uniform) <= 0.999 * uniform for v in losses)  # every step on it
    results = json.loads((killed / "results.json").read_text())
    assert results["uniform_plateau_steps"] == 90 and results["collapsed"] is True


def test_resuming_a_finished_run_returns_its_results_without_training(tmp_path):
    from align.train.config import TrainConfig
    from align.train.loop import train

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, schedule={"steps": 20}, eval={"every": 20, "sharpness": False}))
    first = train(cfg, tmp_path / "run", progress=False)
    stamp = (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns
    messages: list[str] = []
    again = train(cfg, tmp_path / "run", resume=True, progress=False, log=messages.append)
    assert again == first
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert any("already finished" in m for m in messages)


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    from align.train.config import TrainConfig
    from align.train.loop import train

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, schedule={"steps": 20}, eval={"every": 20, "sharpness": False,
                                                                                 "test_split": None}))
    fresh = train(cfg, tmp_path / "fresh", progress=False)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)  # nothing there yet: same as fresh
    assert {k: v for k, v in resumed.items() if k != "wall_time_s"} == {k: v for k, v in fresh.items() if k != "wall_time_s"}


def test_a_pack_resumes_every_run_at_the_newest_step_they_all_have_a_checkpoint_of(tmp_path):
    """A pack killed while its runs stood at different checkpoints (one finished, one at step 40, one at 30 with
    that checkpoint damaged) resumes at step 20 with the finished run idle in its slot, and reaches the bits of the
    uninterrupted pack: results, final weights and every metrics record."""
    import shutil

    from safetensors.torch import load_file

    from align.train.config import TrainConfig
    from align.train.loop import train_pack

    data = make_cache(tmp_path / "cache")
    cells = [(dict(name="msam", lr=1e-2, rho=0.3), 0), (dict(name="msam", lr=3e-2, rho=0.3), 0),
             (dict(name="msam", lr=1e-2, rho=0.1), 1)]
    cfgs = [validate(TrainConfig, train_config(data, optim=cell, seed=seed, schedule={"steps": 60},
                                               checkpoint_every=10, keep_checkpoints=10,
                                               eval={"every": 20, "sharpness": False})) for cell, seed in cells]
    ref = [tmp_path / f"ref{i}" for i in range(3)]
    expected = train_pack(cfgs, ref, progress=False)
    cut = [tmp_path / f"cut{i}" for i in range(3)]
    for a, b in zip(ref, cut):
        shutil.copytree(a, b)
    for run, last in ((cut[1], 40), (cut[2], 30)):
        (run / "results.json").unlink()
        for step in run_dir.list_checkpoints(run):
            if step > last:
                for suffix in (".json", ".safetensors"):
                    (run / "checkpoints" / f"step-{step:07d}{suffix}").unlink()
    (cut[2] / "checkpoints" / "step-0000030.safetensors").write_bytes(b"torn")  # damaged: step 20 is common
    lines: list[str] = []
    got = train_pack(cfgs, cut, resume=True, progress=False, log=lines.append)
    assert any(f"{cut[1]}: its pack resumes at step 20" in line for line in lines), lines
    assert any(f"resuming {cut[2]} from step 20" in line for line in lines), lines
    for i in range(3):
        assert {k: v for k, v in got[i].items() if k != "wall_time_s"} == \
               {k: v for k, v in expected[i].items() if k != "wall_time_s"}
        a = load_file(ref[i] / "checkpoints" / "step-0000060.safetensors")
        b = load_file(cut[i] / "checkpoints" / "step-0000060.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert (ref[i] / "metrics.jsonl").read_bytes() == (cut[i] / "metrics.jsonl").read_bytes()
    assert (cut[0] / "results.json").read_bytes() == (ref[0] / "results.json").read_bytes()  # idle: untouched


def test_a_pack_prunes_old_checkpoints_only_once_every_run_has_written_the_new_one(tmp_path, monkeypatch):
    """Killed between two runs' writes of one step, the pack still finds a step all its runs have (keep = 1)."""
    from align.train.config import TrainConfig
    from align.train.loop import train_pack

    data = make_cache(tmp_path / "cache")
    cfgs = [validate(TrainConfig, train_config(data, optim=dict(name="sam", lr=1e-2, rho=0.1), seed=seed,
                                               schedule={"steps": 30}, checkpoint_every=10, keep_checkpoints=1,
                                               eval={"every": 10, "sharpness": False})) for seed in (0, 1)]
    seen: list[tuple[str, list[int]]] = []
    original = run_dir.save_checkpoint

    def save_and_look(folder, step, tensors, meta, keep=2):
        path = original(folder, step, tensors, meta, keep=keep)
        if step == 20 and Path(folder).name == "r0":  # r0 has written step 20, r1 not yet: what a kill leaves
            seen.extend((name, run_dir.list_checkpoints(tmp_path / name)) for name in ("r0", "r1"))
        return path

    monkeypatch.setattr(run_dir, "save_checkpoint", save_and_look)
    train_pack(cfgs, [tmp_path / "r0", tmp_path / "r1"], progress=False)
    assert seen == [("r0", [10, 20]), ("r1", [10])]  # step 10 is common to both
    assert run_dir.list_checkpoints(tmp_path / "r0") == [30]


def test_a_checkpoint_holds_the_run_under_named_prefixes_and_decodes_to_it(tmp_path):
    """The tensor half: the head under model., the best head under best., the RNG under rng., the optimizer state
    under optim.; the JSON half: the config it must match, the optimizer's structure and the loop state, and no
    scheduler entry. Decoding gives the head, the best head and the counters back; encoding them again gives the
    same two halves."""
    from align.train.config import TrainConfig
    from align.train.loop import train

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05},
                                             schedule={"steps": 20}, checkpoint_every=10,
                                             eval={"every": 10, "sharpness": False}))
    train(cfg, tmp_path / "run", progress=False)
    tensors, meta = run_dir.load_checkpoint(tmp_path / "run", 20)
    head = ["image_head.weight", "image_head.bias", "text_head.weight", "text_head.bias", "log_scale"]
    optim = [k for k in tensors if k.startswith("optim.")]
    assert sorted(tensors) == sorted([f"model.{k}" for k in head] + [f"best.{k}" for k in head] + ["rng.cpu"] + optim)
    assert len(optim) == 3 * len(head)  # AdamW's step, exp_avg and exp_avg_sq of each parameter
    assert sorted(meta) == ["config", "config_hash", "optimizer", "step", "tensors_sha256", "train_state"]

    state = checkpoint.decode_checkpoint(tensors, meta, torch.device("cpu"))
    assert sorted(state.head) == sorted(head) and all(torch.equal(state.head[k], tensors[f"model.{k}"]) for k in head)
    assert state.loop.step == 20 and state.loop.best.step in (10, 20)
    assert all(torch.equal(state.loop.best.state[k], tensors[f"best.{k}"]) for k in head)
    assert torch.equal(state.rng["cpu"], tensors["rng.cpu"])
    again, again_meta = checkpoint.encode_checkpoint(state, meta["config_hash"], meta["config"],
                                                     meta["train_state"]["wall_time_s"])
    assert sorted(again) == sorted(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert json.loads(json.dumps(again_meta)) == {k: v for k, v in meta.items() if k not in ("step", "tensors_sha256")}


def test_a_checkpoint_with_the_old_scheduler_entry_resumes_bit_identically(tmp_path):
    """Checkpoints written before the codec hold a "scheduler" entry that nothing reads: the run resumes from one
    and ends with the uninterrupted run's bits."""
    import shutil

    from safetensors.torch import load_file

    from align.train.config import TrainConfig
    from align.train.loop import train

    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05},
                                             schedule={"steps": 30}, checkpoint_every=10, keep_checkpoints=5,
                                             eval={"every": 10, "sharpness": False}))
    expected = train(cfg, tmp_path / "reference", progress=False)
    shutil.copytree(tmp_path / "reference", tmp_path / "old")
    folder = tmp_path / "old" / "checkpoints"
    for name in ("step-0000030.json", "step-0000030.safetensors"):
        (folder / name).unlink()
    (tmp_path / "old" / "results.json").unlink()
    meta = json.loads((folder / "step-0000020.json").read_text())
    meta["scheduler"] = {"last_epoch": 20, "base_lrs": [1e-2]}  # as the checkpoints of earlier versions hold it
    (folder / "step-0000020.json").write_text(json.dumps(meta, indent=2) + "\n")

    got = train(cfg, tmp_path / "old", resume=True, progress=False)
    assert {k: v for k, v in got.items() if k != "wall_time_s"} == \
           {k: v for k, v in expected.items() if k != "wall_time_s"}
    a = load_file(tmp_path / "reference" / "checkpoints" / "step-0000030.safetensors")
    b = load_file(folder / "step-0000030.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "old" / "metrics.jsonl").read_bytes() == (tmp_path / "reference" / "metrics.jsonl").read_bytes()
