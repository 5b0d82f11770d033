"""Data-parallel training under torch.distributed (2 gloo ranks on the CPU, a free port found at run time).

The pack's step on 2 ranks, each with half of every batch, against the reference path (helpers.reference_run: torch
optimizers driven by take_step on the whole batch, one process): with ``optim.perturbation: global`` every head
of the registry ends within 1e-9 (relative, float64, 20 steps), with the whole gathered loss and with
``loss.local``, and with the loss in row blocks (``loss.block_rows``) as without them; with ``local`` the SAM
family ends elsewhere while the ranks still hold identical weights. Then `align train` itself under torchrun: rank 0
writes the run alone, with the numbers of one process; and (slow) a kill -9 of either rank followed by ``--resume``
gives the uninterrupted 2-rank run bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.common import distributed
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig, clip_loss, clip_loss_rows, siglip_loss, siglip_loss_rows
from align.optim.batched import head_hparams
from align.train.pack import HeadPack
from helpers import group_batches
from align.train.run_data import Sampler, lr_factor
from helpers import CELLS, NEW_CELLS, cell_kwargs, make_cache, reference_run, synthetic_split, train_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

REPO = Path(__file__).resolve().parents[1]
WORLD, STEPS, WARMUP, BATCH = 2, 20, 5, 32
SAM_FAMILY = [c for c in CELLS if c["name"] in ("sam", "msam", "asam", "fsam")]
LINEAR_CLIP = (HeadConfig(kind="linear", out_dim=16), LossConfig(kind="clip"))
# Two groups of heads (seeds 0 and 1), so the features of several batches are gathered in one collective.
JOBS = {
    "global": dict(cells=CELLS, perturbation="global", head=LINEAR_CLIP[0], loss=LINEAR_CLIP[1]),
    "global-issue24": dict(cells=NEW_CELLS, perturbation="global", head=LINEAR_CLIP[0], loss=LINEAR_CLIP[1]),
    "local": dict(cells=CELLS, perturbation="local", head=LINEAR_CLIP[0], loss=LINEAR_CLIP[1]),
    "clip-rows": dict(cells=[CELLS[2], SAM_FAMILY[2]], perturbation="global", head=LINEAR_CLIP[0],
                      loss=LossConfig(kind="clip", local=True)),
    "siglip-rows": dict(cells=[SAM_FAMILY[0], SAM_FAMILY[3]], perturbation="global",
                        head=HeadConfig(kind="starmlp", out_dim=12, hidden_dim=20, pre_norm=True),
                        loss=LossConfig(kind="siglip", clamp="upper", perturb_logit_scale=True, local=True)),
    # The gathered whole loss (loss.local false) of two heads per kind, the twins of the blocked jobs below.
    "clip": dict(cells=[CELLS[2], SAM_FAMILY[1]], perturbation="global", head=LINEAR_CLIP[0], loss=LINEAR_CLIP[1]),
    "siglip": dict(cells=[SAM_FAMILY[0], SAM_FAMILY[3]], perturbation="global",
                   head=HeadConfig(kind="starmlp", out_dim=12, hidden_dim=20, pre_norm=True),
                   loss=LossConfig(kind="siglip", clamp="upper", perturb_logit_scale=True)),
}
# The same jobs with the loss in blocks of 5 rows: the gathered 32 in 7 blocks (the last of 2), a rank's 16 in 4.
BLOCKED = ["clip", "siglip", "clip-rows", "siglip-rows"]
JOBS.update({f"{name}-blocks": dict(JOBS[name], loss=JOBS[name]["loss"].model_copy(update={"block_rows": 5}))
             for name in BLOCKED})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("train", 256))
    return image.double(), text.double(), c2i


def _order(cells: list[dict]) -> list[int]:
    return sorted(range(len(cells)), key=lambda i: cells[i]["seed"])  # heads sharing a batch side by side


def _hparams(cells: list[dict], perturbation: str, **_: object) -> list[dict]:
    """Each head's hyper-parameters in pack order (made here: building torch optimizers imports torch._dynamo,
    seconds that each spawned rank would pay again)."""
    return [head_hparams(cells[i]["name"], lr=cells[i]["lr"], weight_decay=cells[i].get("weight_decay", 0.0),
                         grad_clip=cells[i].get("grad_clip"), perturbation=perturbation, **cell_kwargs(cells[i]))
            for i in _order(cells)]


def _rank_pack_run(cells, head, loss, hparams, rank: int, **_) -> list[dict[str, torch.Tensor]]:
    """test_pack's pack run, with this rank's half of every batch → each cell's final state dict."""
    image, text, c2i = _data()
    order = _order(cells)
    models = []
    for i in order:
        torch.manual_seed(cells[i]["seed"])
        models.append(build_model(head, loss, image.shape[1], text.shape[1]).double())
    pack = HeadPack(models, hparams, [loss.clamp] * len(cells), job=distributed.current())
    samplers = {s: Sampler(c2i, image.shape[0], BATCH, s, torch.device("cpu")) for s in (0, 1)}
    seeds = [cells[i]["seed"] for i in order]
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for step in range(STEPS):
        groups = []
        for s in sorted(set(seeds)):
            rows_i, rows_t = samplers[s].batch(step)
            groups.append((slice(seeds.index(s), len(seeds) - seeds[::-1].index(s)), rows_i[half], rows_t[half]))
        pack.step(group_batches(groups, image, text), [lr * lr_factor(step, STEPS, WARMUP) for lr in pack.hp.host["lr"]])
    states = {i: pack.head_state(slot) for slot, i in enumerate(order)}
    return [states[i] for i in range(len(cells))]


def _rank_main(rank: int, port: int, out: str, hparams: dict[str, list[dict]]) -> None:
    """One rank of the spawned job: join it as torchrun would have us, run every job, save the final weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    assert distributed.current().world_size == WORLD
    results = {name: _rank_pack_run(**job, hparams=hparams[name], rank=rank) for name, job in JOBS.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every job of JOBS on 2 spawned gloo ranks → each rank's final weights."""
    out = tmp_path_factory.mktemp("ranks")
    hparams = {name: _hparams(**job) for name, job in JOBS.items()}
    torch.multiprocessing.spawn(_rank_main, args=(free_port(), str(out), hparams), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


_REFERENCES: dict[str, dict[str, torch.Tensor]] = {}


def _reference(job: dict, cell: dict) -> dict[str, torch.Tensor]:
    """The cell trained alone in one process on the whole batch (helpers.reference_run), computed once."""
    loss = job["loss"].model_copy(update={"local": False, "block_rows": None})
    key = repr((job["head"], loss, sorted(cell.items())))
    if key not in _REFERENCES:
        image, text, c2i = _data()
        _REFERENCES[key] = reference_run(cell, job["head"], job["loss"], image, text, c2i, steps=STEPS,
                                         warmup=WARMUP, batch=BATCH)
    return _REFERENCES[key]


@pytest.mark.parametrize("name", ["global", "global-issue24", "clip-rows", "siglip-rows", *(f"{n}-blocks" for n in BLOCKED)])
def test_two_ranks_with_a_global_perturbation_train_as_one_process_on_the_whole_batch(two_ranks, name):
    job = JOBS[name]
    assert {c["name"] for c in SAM_FAMILY} == {"sam", "msam", "asam", "fsam"}
    for i, cell in enumerate(job["cells"]):
        want = _reference(job, cell)
        for key, value in want.items():
            for rank in range(WORLD):
                assert torch.equal(two_ranks[rank][name][i][key], two_ranks[0][name][i][key]), (cell, key, rank)
            rel = _rel(two_ranks[0][name][i][key], value)
            assert rel <= 1e-9, (name, cell, key, rel)


@pytest.mark.parametrize("name", BLOCKED)
def test_two_ranks_with_the_gathered_loss_in_blocks_train_as_two_ranks_without(two_ranks, name):
    """Blocks of the whole gathered loss on every rank (loss.local false) and of each rank's rows (true)."""
    for rank in range(WORLD):
        for i, cell in enumerate(JOBS[name]["cells"]):
            for key, want in two_ranks[rank][name][i].items():
                assert _rel(two_ranks[rank][f"{name}-blocks"][i][key], want) <= 1e-10, (name, cell, key, rank)


def test_a_local_perturbation_moves_the_sam_family_elsewhere_with_identical_ranks(two_ranks):
    job = JOBS["local"]
    for i, cell in enumerate(job["cells"]):
        local, whole = two_ranks[0]["local"][i], two_ranks[0]["global"][i]
        for key in local:
            assert torch.equal(two_ranks[1]["local"][i][key], local[key]), (cell, key)
        weight = "image_head.weight"
        if cell["name"] in ("sgd", "adam", "adamw"):  # no perturbation: the option does not apply
            assert _rel(local[weight], _reference(job, cell)[weight]) <= 1e-9, cell
        else:  # δ from each rank's half-batch gradient: another trajectory
            assert _rel(local[weight], whole[weight]) > 1e-4, cell


def test_a_rows_loss_averaged_over_equal_parts_of_the_batch_is_the_whole_loss():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.float64), dim=-1)
    parts = [slice(0, 4), slice(4, 8), slice(8, 12)]
    clip = sum(clip_loss_rows(img, txt, 7.0, rows) for rows in parts) / 3
    sig = sum(siglip_loss_rows(img, txt, 7.0, -2.0, rows) for rows in parts) / 3
    assert float(clip) == pytest.approx(float(clip_loss(img, txt, 7.0)), rel=1e-12)
    assert float(sig) == pytest.approx(float(siglip_loss(img, txt, 7.0, -2.0)), rel=1e-12)


# -- `align train` under torchrun ---------------------------------------------------------------------------

def torchrun(args: list[str], port: int | None = None) -> list[str]:
    """``torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port PORT ARGS`` (python -m torch.distributed.run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
            "127.0.0.1", "--master-port", str(port or free_port()), *args]


def run_env() -> dict[str, str]:
    """The environment of a launched command: `align` on the PATH (the one installed next to this Python), one
    thread per rank, no network."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))


def align_command() -> list[str]:
    """`--no-python align` when the entry point is installed, else the same app through its module."""
    if shutil.which("align", path=run_env()["PATH"]):
        return ["--no-python", "align"]
    return ["-m", "align.cli.main"]


TRAIN_STEPS = 30


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("torchrun-train")
    data = make_cache(root / "cache")
    cfg = train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05, "base": "adamw"},
                       schedule={"steps": TRAIN_STEPS, "batch_size": 64, "warmup_steps": 5},
                       eval={"every": 10, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                             "sharpness_ascent_steps": 1},
                       checkpoint_every=10, loss_at_step=20)
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": config, "cfg": cfg}


@pytest.fixture(scope="module")
def two_rank_run(train_setup) -> dict:
    """`torchrun --nproc-per-node 2 --no-python align train --config train.yaml --out two-ranks --no-progress`."""
    root, config = train_setup["root"], train_setup["config"]
    run = root / "two-ranks"
    proc = subprocess.run(torchrun([*align_command(), "train", "--config", str(config), "--out", str(run),
                                    "--no-progress"]), cwd=root, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    return {"run": run, "proc": proc}


def test_align_train_under_torchrun_writes_one_run_that_matches_one_process(train_setup, two_rank_run, tmp_path):
    """One results table, every step logged once, and the numbers of the same run trained in one process
    (float32: to rounding)."""
    from align.train.config import TrainConfig
    from align.train.loop import train

    run, proc = two_rank_run["run"], two_rank_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results:") == 1, proc.stdout  # rank 0 reports for the job
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, TRAIN_STEPS + 1))
    got = json.loads((run / "results.json").read_text())
    one = train(TrainConfig.model_validate(train_setup["cfg"]), tmp_path / "one", progress=False)
    assert got["status"] == one["status"] == "done"
    single = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, single):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        for key in ("loss", "grad_norm", "perturbation_norm", "mean_R@1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a, b, key)
    # the uniform plateau, counted once from the whole batch's loss that every rank sees
    uniform = math.log(train_setup["cfg"]["schedule"]["batch_size"])
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    plateau = best = 0
    for loss in losses:
        plateau = plateau + 1 if abs(loss - uniform) <= 0.05 * uniform else 0
        best = max(best, plateau)
    assert got["uniform_plateau_steps"] == one["uniform_plateau_steps"] == best


# name → (the rank that dies, its kill point). Slow: two more launches each (≈ 25 s on 2 shared cores).
KILLS = {
    "rank 1 mid-step (between M-SAM's two passes)": (1, {"call": "align.train.pack:HeadPack._grads", "nth": 28}),
    "rank 0 between a checkpoint's two halves": (0, {"replace": "step-0000020.json"}),
    "rank 0 during the final evaluation": (0, {"call": "align.train.evaluation:RunEvaluator.evaluate", "nth": 1}),
}


def kill_then_resume(train_setup, two_rank_run, name: str, kill_rank: int, kill: dict) -> None:
    """The 2-rank run with one rank killed (SIGKILL; torchrun then stops the other), then `torchrun ... align
    train --config RUN/config.yaml --resume`: the uninterrupted 2-rank run, bit for bit."""
    from faults import assert_one_line_per_survivor, assert_same_run

    root = train_setup["root"]
    run = root / f"killed-{kill_rank}-{abs(hash(name)) % 10 ** 6}"
    driver = [str(REPO / "tests" / "rank_driver.py"), json.dumps(kill), str(kill_rank)]
    killed = subprocess.run(torchrun([*driver, "train", "--config", str(train_setup["config"]), "--out", str(run),
                                      "--no-progress"]), cwd=root, env=run_env(), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert_one_line_per_survivor(killed.stderr, [1 - kill_rank], WORLD, "run the same command with --resume")
    assert not (run / "results.json").exists() or kill.get("call") == "align.train.evaluation:RunEvaluator.evaluate"
    resumed = subprocess.run(torchrun([*align_command(), "train", "--config", str(run / "config.yaml"), "--resume",
                                       "--no-progress"]), cwd=root, env=run_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming") == 1, resumed.stderr  # rank 0 speaks for the job
    assert two_rank_run["proc"].returncode == 0
    assert_same_run(two_rank_run["run"], run, TRAIN_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILLS))
def test_a_killed_rank_then_resume_gives_the_uninterrupted_two_rank_run(train_setup, two_rank_run, name):
    kill_then_resume(train_setup, two_rank_run, name, *KILLS[name])


def test_resume_with_nothing_to_resume_under_torchrun_is_one_line_on_each_rank_and_writes_nothing(train_setup,
                                                                                                  tmp_path):
    """Rank 0 looks for the run and every rank hears its refusal (issue 21): no rank starts a fresh run."""
    empty = tmp_path / "empty"
    proc = subprocess.run(torchrun([*align_command(), "train", "--config", str(train_setup["config"]), "--out",
                                    str(empty), "--resume", "--no-progress"]), cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    line = (f"error: --resume: no run to continue in {empty}: leave out --resume to start one there, or give the "
            "run's own --config RUN/config.yaml")
    assert proc.returncode != 0 and proc.stderr.count(line) == WORLD, proc.stderr[-3000:]
    assert not empty.exists()


def test_a_batch_that_does_not_split_evenly_over_the_ranks_is_refused_before_anything_is_written(tmp_path):
    from align.common.distributed import Rank
    from align.common.errors import AlignError
    from align.train.config import TrainConfig
    from align.train.loop import train_pack

    cfg = TrainConfig.model_validate(train_config(make_cache(tmp_path / "cache"), schedule={"batch_size": 64}))
    with pytest.raises(AlignError, match="multiple of the 3 ranks.*batch_size=63"):
        train_pack([cfg], [tmp_path / "run"], job=Rank(0, 3))  # refused before any collective
    assert not (tmp_path / "run").exists()


# -- M-SAM's averaged metric with a local perturbation: one per rank in the checkpoint ---------------------------

def _resume_main(rank: int, port: int, root: str) -> None:
    """A 2-rank run, then a copy of it cut back to its step-10 checkpoint resumed on the same 2 ranks."""
    from align.train.config import TrainConfig
    from align.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root_path = Path(root)
    cfg = TrainConfig.model_validate(json.loads((root_path / "cfg.json").read_text()))
    distributed.init(torch.device("cpu"))  # as distributed.joined does for `align train`: train() trains in the group
    train(cfg, root_path / "reference", progress=False)
    distributed.barrier()
    if rank == 0:
        shutil.copytree(root_path / "reference", root_path / "cut")
        for name in ("checkpoints/step-0000020.json", "checkpoints/step-0000020.safetensors", "results.json"):
            (root_path / "cut" / name).unlink()
    distributed.barrier()
    train(cfg, root_path / "cut", resume=True, progress=False)
    distributed.shutdown()


@pytest.mark.slow
def test_a_local_msam_metric_is_kept_per_rank_and_resumes_only_on_as_many_ranks(tmp_path):
    from faults import assert_same_run

    from align.common.errors import AlignError
    from align.train.config import TrainConfig
    from align.train.loop import train

    cfg = train_config(make_cache(tmp_path / "cache"),
                       optim={"name": "msam", "lr": 1e-2, "rho": 0.2, "metric_beta": 0.9, "perturbation": "local"},
                       schedule={"steps": 20, "batch_size": 64, "warmup_steps": 2},
                       eval={"every": 10, "sharpness": False}, checkpoint_every=10, loss_at_step=10)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    torch.multiprocessing.spawn(_resume_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert_same_run(tmp_path / "reference", tmp_path / "cut", 20)
    meta = json.loads((tmp_path / "reference" / "checkpoints" / "step-0000020.json").read_text())
    assert "metric_ema_ranks" in json.dumps(meta["optimizer"])
    shutil.copytree(tmp_path / "reference", tmp_path / "alone")
    (tmp_path / "alone" / "results.json").unlink()
    with pytest.raises(AlignError, match="trained on 2 ranks.*resume it on 2 ranks"):
        train(TrainConfig.model_validate(cfg), tmp_path / "alone", resume=True, progress=False)


def test_the_new_keys_at_their_defaults_leave_a_runs_config_hash_as_it_was(tmp_path):
    """loss.local, loss.block_rows, optim.perturbation, eval.sharpness_final, uniform_plateau_tol, collapse_fraction,
    schedule.order, schedule.block_rows, the method keys of issue 24 (optim.rho_min, sigma, lmbda, k) and issue 25's
    head.activation, head.rescale and eval.sharpness_geometries came after
    runs were trained: at their defaults they are not hashed, so those runs still resume; set, they are."""
    from align.train.identity import config_hash
    from align.train.config import TrainConfig, hashed_config

    cfg = TrainConfig.model_validate(train_config(make_cache(tmp_path / "cache"), optim={"name": "msam"}))
    before = cfg.model_dump(mode="json")  # what a run written before the keys existed holds
    for key in ("out_dir", "device", "uniform_plateau_tol", "collapse_fraction", "report_to", "report_group"):
        before.pop(key)
    del before["loss"]["local"], before["loss"]["block_rows"], before["optim"]["perturbation"]
    del before["eval"]["sharpness_final"]
    del before["schedule"]["order"], before["schedule"]["block_rows"]
    for key in ("rho_min", "sigma", "lmbda", "k"):
        del before["optim"][key]
    del before["head"]["activation"], before["head"]["rescale"], before["eval"]["sharpness_geometries"]  # issue 25
    assert config_hash(hashed_config(cfg)) == config_hash(before)
    for section, key, value in (("head", "rescale", 10.0), ("head", "activation", "relu"),
                                ("eval", "sharpness_geometries", ["monge"])):  # issue 25's keys, set: hashed
        changed = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={key: value})})
        assert config_hash(hashed_config(changed)) != config_hash(before), key
    gsam = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"name": "gsam", "rho_min": 0.01})})
    assert config_hash(hashed_config(gsam)) != config_hash({**before, "optim": {**before["optim"], "name": "gsam"}})
    best_only = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"sharpness_final": False})})
    assert config_hash(hashed_config(best_only)) != config_hash(before)
    local = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"perturbation": "local"})})
    assert config_hash(hashed_config(local)) != config_hash(before)


# -- the torchrun idiom: rank 0's run directory and its read-only twin; a job of one inside a group -----------------

def test_ranks_other_than_0_hold_a_read_only_twin_of_the_run_directory(tmp_path):
    """The twin reads what rank 0 wrote and writes nothing, not even the folder."""
    from align.common.distributed import Rank
    from align.train.run_dir import ReadOnlyRunDir, RunDir

    main, other = RunDir.for_rank(tmp_path / "run", Rank(0, 2)), RunDir.for_rank(tmp_path / "run", Rank(1, 2))
    assert type(main) is RunDir and type(other) is ReadOnlyRunDir
    assert type(RunDir.for_rank(tmp_path / "run", distributed.SINGLE)) is RunDir
    other.begin(0)
    other.save_checkpoint(10, {"w": torch.ones(2)}, {}, keep=2)
    other.write_results({"status": "done"})
    assert not (tmp_path / "run").exists()
    main.begin(0)
    main.save_checkpoint(10, {"w": torch.ones(2)}, {}, keep=2)
    main.write_results({"status": "done"})
    assert other.checkpoint_steps() == [10] and other.read_results() == {"status": "done"}


def _own_job_main(rank: int, port: int, out: str) -> None:
    """In a joined 2-rank group, decisions of a job of one (SINGLE: a study's pack on one rank) stay on that rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    distributed.init(torch.device("cpu"))
    alone = distributed.from_main(lambda: f"rank {rank}", distributed.SINGLE)
    joined = distributed.from_main(lambda: f"rank {rank}", distributed.current())
    failed = None
    try:
        with distributed.together(distributed.SINGLE):
            if rank == 1:
                raise ValueError("rank 1 alone")
    except ValueError as exc:
        failed = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps({"alone": alone, "joined": joined, "failed": failed}))
    distributed.shutdown()


def test_a_job_of_one_inside_a_process_group_decides_alone(tmp_path):
    torch.multiprocessing.spawn(_own_job_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    assert got == [{"alone": "rank 0", "joined": "rank 0", "failed": None},
                   {"alone": "rank 1", "joined": "rank 0", "failed": "rank 1 alone"}]
