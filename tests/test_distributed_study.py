"""`align embed` and `align compare` under torchrun: 2 CPU ranks (gloo) on a free port, against one process.

The commands are the README's "Scaling out" ones (`python -m torch.distributed.run` is the `torchrun` script):
single node with `--standalone`, and the SLURM form with a c10d rendezvous endpoint. Reference: the same study in
this process. What must hold: the cache arrays byte for byte, the study's results.csv byte for byte, rank 0 alone
writes the study's files and prints; a rank killed with SIGKILL leaves work that a rerun with any number of ranks
(1 included) finishes to the same bytes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from faults import assert_one_line_per_survivor

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy")
runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_dir) -> dict:
    """A 6-cell study (AdamW, SAM, M-SAM × 2 seeds) over a tiny random open_clip model, and its single-process
    reference: 96 training images (2 image shards, 3 caption shards of ENCODE_ROWS = 64 rows) and 8 each for
    val and test (one shard: one rank has nothing to encode)."""
    root = tmp_path_factory.mktemp("distributed")
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    config = {
        "name": "ranks", "workers": 1, "reference": "sam",
        "data": {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 96, "val_images": 8, "test_images": 8,
                                                                "image_size": 32, "captions_per_image": 2}},
                 "splits": ["train", "val", "test"], "image_encoder": encoder, "text_encoder": encoder,
                 "batch_size": 64, "shard_size": 64, "device": "cpu", "cache_root": str(root / "cache-ref")},
        "head": {"kind": "linear", "out_dim": 8},
        "optim": {"base": "adamw"},
        "schedule": {"steps": 16, "batch_size": 16, "warmup_steps": 2},
        "eval": {"every": 8, "knn_k": 2, "ks": [1, 5], "hessian_iters": 2, "hutchinson_samples": 2,
                 "sharpness_batches": 1, "sharpness_ascent_steps": 1},
        "loss_at_step": 8, "checkpoint_every": 8, "device": "cpu",
        "grid": {"optimizers": ["adamw", "sam", "msam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1]},
    }
    path = root / "study.yaml"
    path.write_text("# torchrun --standalone --nproc-per-node 2 --no-python align compare --config study.yaml\n"
                    + yaml.safe_dump(config))
    result = runner.invoke(app, ["compare", "--config", str(path), "--out", str(root / "ref"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"root": root, "config": path, "ref": root / "ref", "cache": root / "cache-ref"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, *args: str, env: dict | None = None, standalone: bool = False) -> subprocess.CompletedProcess:
    """`torchrun ... --no-python align ARGS` with ``ranks`` CPU ranks on this node: `--standalone` (the
    single-node example) or the multi-node form with a c10d rendezvous on a free local port (the SLURM example)."""
    where = (["--standalone"] if standalone else
             ["--nnodes", "1", "--rdzv-id", "test", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{free_port()}"])
    command = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(ranks),
               "--no-python", "align", *args]
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's `align`
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def align_cmd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same `align ARGS` as one plain process (no torchrun)."""
    return subprocess.run([sys.executable, "-m", "align.cli.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_same_arrays(ref_root: Path, got_root: Path) -> list[dict]:
    """Every cache folder of ``ref_root`` has a twin under ``got_root`` with byte-identical arrays → their
    manifests."""
    import json

    keys = sorted(p.name for p in ref_root.iterdir())
    assert keys and sorted(p.name for p in got_root.iterdir()) == keys
    for key in keys:
        for name in ARRAYS:
            assert (got_root / key / name).read_bytes() == (ref_root / key / name).read_bytes(), (key, name)
        assert not (got_root / key / "work").exists()
    return [json.loads((got_root / key / "manifest.json").read_text()) for key in keys]


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from align.common import distributed as d
    from align.common.errors import AlignError
    from align.common.locks import exclusive

    me = d.init(torch.device("cpu"), timeout_s=120)
    out = {"rank": me.rank, "world": me.world_size, "value": d.from_main(lambda: f"made by rank {me.rank}")}

    def refuse():
        raise AlignError("refused on rank 0")

    try:
        d.from_main(refuse)
    except AlignError as exc:
        out["from_main"] = str(exc)
    try:
        with d.together():
            if me.rank == 1:
                raise AlignError("disk full on rank 1")
    except AlignError as exc:
        out["together"] = str(exc)
    with d.main_first():
        if me.is_main:
            Path(sys.argv[1], "first.txt").write_text("written by rank 0 first")
        out["main_first"] = Path(sys.argv[1], "first.txt").read_text()
    try:
        with d.main_first():
            if me.is_main:
                raise ValueError("boom")
            out["ran_after_a_failure"] = True
    except Exception as exc:
        out["main_first_failure"] = f"{type(exc).__name__}: {exc}"
    try:
        with d.main_holds(lambda: exclusive(Path(sys.argv[1], "locked"), "study")):
            out["held"] = True
    except AlignError as exc:
        out["main_holds"] = str(exc)
    print(json.dumps(out), flush=True)
    d.shutdown()
""")


def test_rank_zero_decides_and_a_failure_on_any_rank_is_raised_on_every_rank(tmp_path):
    """The helpers embed and compare build on, with 2 gloo ranks started by hand (torchrun's variables)."""
    import json

    from align.common.locks import exclusive

    port = free_port()
    with exclusive(tmp_path / "locked", "study"):  # held here: rank 0's main_holds is refused
        procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                           LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in range(2)]
        done = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in done]
    zero, one = (json.loads(out.strip().splitlines()[-1]) for out, _ in done)
    assert (zero["rank"], one["rank"], zero["world"]) == (0, 1, 2)
    assert zero["value"] == one["value"] == "made by rank 0"
    assert zero["from_main"] == one["from_main"] == "refused on rank 0"
    assert zero["together"] == one["together"] == "disk full on rank 1"
    assert zero["main_first"] == one["main_first"] == "written by rank 0 first"
    assert zero["main_first_failure"] == "ValueError: boom"  # rank 0 keeps its own exception (and traceback)
    assert one["main_first_failure"] == "AlignError: rank 0 failed: ValueError: boom"
    assert "ran_after_a_failure" not in one and "held" not in zero and "held" not in one
    assert zero["main_holds"] == one["main_holds"]
    assert f"is in use by process {os.getpid()}" in one["main_holds"]


DYING_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from align.common import distributed as d
    from align.common.errors import AlignError

    try:
        with d.joined("cpu", timeout_s=120, resume="run it again") as me:
            d.barrier()
            if me.rank == 1:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # SIGKILL: dies; SIGTERM: as torchrun stops it
            d.barrier()  # rank 0 waits here for a rank that is gone
    except AlignError as exc:
        print(f"LINE {exc}", flush=True)
        sys.exit(2)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_when_a_rank_dies_every_other_rank_stops_with_one_line(how):
    """Two gloo ranks started by hand (torchrun's variables); rank 1 is killed, or gets the SIGTERM torchrun sends
    to every rank once one has failed. Each rank still alive says one line: who, what happened, how to resume;
    no traceback."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", DYING_SCRIPT, how], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 2 and "Traceback" not in err0, err0[-3000:]
    assert out0.startswith("LINE rank 0 of 2 lost another rank of the job (") and out0.count("\n") == 1, out0
    assert "it stopped or was killed" in out0 and out0.rstrip().endswith(": run it again"), out0
    if how == "SIGKILL":
        assert procs[1].returncode == -9 and out1 == ""
    else:  # the rank that got SIGTERM says so itself, then exits on its own
        assert procs[1].returncode == 2 and "Traceback" not in err1, err1[-3000:]
        assert out1 == ("LINE rank 1 of 2 was stopped by SIGTERM (torchrun stops every rank once one has failed: its "
                        "summary says which; or the job was cancelled): run it again\n"), out1


def test_rank_zero_waits_for_files_other_ranks_wrote_and_names_one_it_never_sees(tmp_path):
    import threading
    import time

    from align.common.errors import AlignError
    from align.common.files import wait_until_visible

    late = tmp_path / "work" / "text-00001.json"
    late.parent.mkdir()
    threading.Timer(0.3, late.write_text, args=("{}",)).start()  # another rank's shard, seen a moment later
    t = time.monotonic()
    wait_until_visible([late], "embedding shards", timeout_s=30, poll_s=0.05)
    assert 0.25 < time.monotonic() - t < 10
    with pytest.raises(AlignError, match=r"1 embedding shards written by other ranks not visible here after 0.2 s "
                                         r"\(first: .*never\.json\): every rank must see one file system"):
        wait_until_visible([late, tmp_path / "never.json"], "embedding shards", timeout_s=0.2, poll_s=0.05)


def test_packs_are_dealt_largest_first_to_the_least_loaded_rank():
    from align.common.distributed import deal

    assert deal([4, 4, 1, 1], 2) == [[0, 2], [1, 3]]
    # 4 to rank 0; 2 and 2 to rank 1 (level at 4), 1 to rank 0 (the tie goes to the lower rank), 1 to rank 1
    assert deal([1, 4, 2, 2, 1], 2) == [[0, 1], [2, 3, 4]]
    assert deal([3, 2], 1) == [[0, 1]] and deal([5], 3) == [[0], [], []]


def test_two_ranks_embed_and_compare_write_the_single_process_bytes(study):
    """One launch, the README's single-node command: the study embeds its splits (shared out) then trains."""
    root, config, out = study["root"], study["config"], study["root"] / "two"
    cache = root / "cache-2"
    compare = torchrun(2, "compare", "--config", str(config), "--set", f"data.cache_root={cache}", "--out", str(out),
                       "--no-progress", standalone=True)
    assert compare.returncode == 0, compare.stderr[-3000:]
    manifests = assert_same_arrays(study["cache"], cache)
    assert [m["run"]["ranks"] for m in manifests] == [2, 2, 2]
    assert "rank 1 of 2: throughput this run: nothing left to encode" in compare.stdout  # 1-shard val and test
    assert "6 runs in 3 pack(s) of up to 2 heads, 1 at a time on each of 2 ranks" in compare.stdout
    assert compare.stdout.count("Best configuration per optimizer") == 1  # rank 0 alone reports
    assert (out / "results.csv").read_bytes() == (study["ref"] / "results.csv").read_bytes()
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 6
    for name in ("summary.csv", "table3.csv", "robustness.csv", "report.md", "config.yaml"):
        assert (out / name).is_file(), name


# Installed through PYTHONPATH in every process: SIGKILL the rank ALIGN_TEST_KILL_RANK at a chosen moment.
KILLER = textwrap.dedent("""
    import os, signal
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("ALIGN_TEST_KILL_RANK"):
        what, arg = os.environ["ALIGN_TEST_KILL_AT"].split(":", 1)
        if what == "file":  # right after an embed shard's .json (the shard counts as done) is written
            import align.cache.work as cache_work
            original = cache_work.save_text

            def write_then_maybe_die(path, text):
                original(path, text)
                if path.name == arg:
                    os.kill(os.getpid(), signal.SIGKILL)

            cache_work.save_text = write_then_maybe_die
        else:  # "step": right after a cell logs this training step
            import align.train.run_dir as run_dir
            original = run_dir.append_metrics

            def append_then_maybe_die(run, record):
                original(run, record)
                if record.get("kind") == "train" and record["step"] == int(arg):
                    os.kill(os.getpid(), signal.SIGKILL)

            run_dir.append_metrics = append_then_maybe_die
""")


@pytest.mark.slow
def test_a_killed_rank_leaves_work_that_reruns_with_one_or_two_ranks_finish_to_the_same_bytes(study, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'hook'}{os.pathsep}{REPO}", ALIGN_TEST_KILL_RANK="1")
    cache, out = tmp_path / "cache", tmp_path / "study"
    args = ("--config", str(study["config"]), "--set", f"data.cache_root={cache}", "--no-progress")

    # a key another process is writing: rank 0 finds it locked, and every rank stops with the same one line
    from align.cache.key import EmbedConfig, cache_path
    from align.common.locks import exclusive

    train = cache_path(EmbedConfig.model_validate(dict(yaml.safe_load(study["config"].read_text())["data"],
                                                       cache_root=str(cache))), "train")
    with exclusive(train, "cache"):
        refused = torchrun(2, "embed", *args, env=env, standalone=True)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, refused.stderr[-3000:]
    assert f"is in use by process {os.getpid()}" in lines[0]

    # rank 1 dies right after its first caption shard of the training split; rank 0 is stopped by torchrun
    killed = torchrun(2, "embed", *args, env=dict(env, ALIGN_TEST_KILL_AT="file:text-00001.json"))
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert_one_line_per_survivor(killed.stderr, [0], 2, "finished shards are kept: run the same command again to resume")
    work = next(p for p in cache.iterdir() if p.name.startswith("synthetic-train")) / "work"
    assert (work / "text-00001.json").is_file() and not (work.parent / "manifest.json").exists()
    embed = align_cmd("embed", *args, env=env)  # one process resumes what two ranks began
    assert embed.returncode == 0 and "resuming" in embed.stdout, embed.stderr[-3000:]
    manifests = assert_same_arrays(study["cache"], cache)
    assert any(m["run"]["resumed"] for m in manifests)

    # rank 1 dies in the middle of its first cell (after the step-8 checkpoint); two ranks pick its cells up
    killed = torchrun(2, "compare", *args, "--out", str(out), env=dict(env, ALIGN_TEST_KILL_AT="step:12"))
    assert killed.returncode != 0 and not (out / "results.csv").exists(), killed.stderr[-3000:]
    assert_one_line_per_survivor(killed.stderr, [0], 2, "finished cells are kept: run the same command again to resume")
    unfinished = [d for d in (out / "runs").iterdir() if not (d / "results.json").exists()]
    # rank 1's cells stopped after their step-8 checkpoint (rank 0's, stopped by torchrun, may not have reached one)
    assert any((d / "checkpoints").is_dir() for d in unfinished)
    rerun = torchrun(2, "compare", *args, "--out", str(out), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "results.csv").read_bytes() == (study["ref"] / "results.csv").read_bytes()
