"""Training and evaluation read the cache through its memory maps (``align.cache.embeddings.EmbeddingRows``,
``align.train.batches``): no split is copied whole, a batch holds the values of an in-memory float32 copy, reading
ahead changes nothing, the blocks order is the documented one and resumes exactly, and a split streamed through the
heads in several chunks agrees with one chunk."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SIZES,
    data_section,
    make_cache,
    synthetic_split,
    train_config,
    write_cache,
)
from safetensors.torch import load_file

from align.cache import embeddings
from align.cache.embeddings import EmbeddingRows, PairedEmbeddings
from align.cache.key import EmbedConfig, cache_path
from align.cache.read import load_cache_dir
from align.common.config import validate
from align.common.errors import AlignError
from align.train import batches
from align.train.config import TrainConfig, hashed_config
from align.train.evaluation import RunEvaluator
from align.train.heads import build_model
from align.train.loop import Trainer, train, train_pack
from align.train.optimizer import head_hparams_of
from align.train.pack import HeadPack
from align.train.run_data import WINDOW_BLOCKS, RunData, Sampler

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def _random_cache(root: Path, dtype: str, sizes: dict[str, int], dim: int = 24, captions: int = 3) -> dict:
    """Train/val/test splits of random ``dtype`` embeddings (uneven captions per image) → the data section."""
    data = data_section(root)
    for split, n in sizes.items():
        image, text, c2i = synthetic_split(split, n, captions=captions, image_dim=dim, text_dim=dim)
        write_cache(data, split, image.astype(dtype), text.astype(dtype), c2i)
    return data


# ---------------------------------------------------------------------------------------- no whole copy

ANON_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from align.common.config import validate
    from align.train.config import TrainConfig
    from align.train.loop import train

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    small, large = (validate(TrainConfig, json.loads(arg)) for arg in sys.argv[1:3])
    train(small, Path(sys.argv[3]) / "small", progress=False)  # what any run allocates once (~80 MB: autograd, BLAS)
    peak, done = [0], threading.Event()

    def watch():  # a whole copy is held for the whole run: sampling cannot miss it
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.005)

    before = anon_kib()
    watcher = threading.Thread(target=watch)
    watcher.start()
    train(large, Path(sys.argv[3]) / "large", progress=False)
    done.set()
    watcher.join()
    print(json.dumps({"before": before, "peak": max(peak[0], anon_kib())}))
""")


@pytest.mark.slow
def test_training_never_holds_a_whole_float32_copy_of_the_training_split(tmp_path):
    """100,000 pairs of 512-d float16 embeddings: a float32 copy of the training split is 410 MB (205 MB per
    tower), which the loader before memory maps held for the whole run. In a process warmed up by a run on 1,000
    pairs, a run on them (loading and hashing the cache, 6 steps of batch 256, validation and test) must grow its
    anonymous memory by less than a quarter of that (measured: about 10 MB; the loader before: over 400 MB)."""
    n, dim = 100_000, 512
    rng = np.random.default_rng(0)
    configs = []
    for name, rows in (("small", 1000), ("large", n)):
        data = data_section(tmp_path / name)
        data["storage_dtype"] = "float16"
        for split, count in (("train", rows), ("val", 300), ("test", 300)):
            write_cache(data, split, *(rng.standard_normal((count, dim), dtype=np.float32).astype(np.float16)
                                       for _ in range(2)), np.arange(count, dtype=np.int64))
        configs.append(json.dumps(train_config(data, schedule={"steps": 6, "batch_size": 256, "warmup_steps": 1},
                                               eval={"every": 3, "sharpness": False}, checkpoint_every=3,
                                               loss_at_step=3)))
    proc = subprocess.run([sys.executable, "-c", ANON_SCRIPT, *configs, str(tmp_path / "runs")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    kib = json.loads(proc.stdout.splitlines()[-1])
    whole_copy_mib = 2 * n * dim * 4 / 2 ** 20
    grown_mib = (kib["peak"] - kib["before"]) / 1024
    assert grown_mib < whole_copy_mib / 4, (grown_mib, whole_copy_mib)


def test_a_loaded_split_reads_its_rows_from_memory_maps_of_the_cache_files(tmp_path):
    data = _random_cache(tmp_path, "float16", {"train": 40})
    folder = cache_path(EmbedConfig.model_validate(data), "train")
    paired = load_cache_dir(folder)
    for rows, name in ((paired.image, "image.npy"), (paired.text, "text.npy")):
        assert rows.mapped and isinstance(rows.array, np.memmap) and not rows.array.flags.writeable
        assert Path(rows.array.filename) == folder / name and rows.array.dtype == np.float16
    assert not PairedEmbeddings(torch.zeros(3, 2), torch.zeros(3, 2), torch.arange(3)).image.mapped


def test_a_later_load_of_a_verified_cache_reads_none_of_its_rows(tmp_path, monkeypatch):
    """The scan for NaN rows runs with the hashing, on the files verified.json does not vouch for: the first load
    scans both embedding files, the next one neither (every worker and rank of a study loads a cache larger than
    memory without reading it through), and a file written since is scanned (and hashed) again."""
    import time

    from align.cache import read

    data = _random_cache(tmp_path, "float32", {"val": 30})
    folder = cache_path(EmbedConfig.model_validate(data), "val")
    time.sleep(read.RACY_NS / 1e9 + 0.05)  # older than the racy window, as any cache not written just now
    scanned: list[int] = []
    real = read._nonfinite_rows
    monkeypatch.setattr(read, "_nonfinite_rows", lambda array: scanned.append(len(array)) or real(array))
    load_cache_dir(folder)
    assert sorted(scanned) == sorted([30, len(np.load(folder / "text.npy"))])
    scanned.clear()
    load_cache_dir(folder)
    assert scanned == []
    text = np.load(folder / "text.npy")
    text[2, 0] = float("nan")
    np.save(folder / "text.npy", text)
    with pytest.raises(AlignError, match=r"text\.npy has 1 row\(s\) with NaN"):
        load_cache_dir(folder)
    assert scanned == [len(text)]


# ---------------------------------------------------------------------------------------- batch values

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_batches_and_chunks_equal_an_in_memory_float32_copy(tmp_path, dtype):
    """Rows gathered in any order (repeats too), into a given buffer or not, through a subset view, and chunks of
    consecutive rows hold exactly the values of ``np.load(...).astype(float32)`` (float16 → float32 is exact)."""
    data = _random_cache(tmp_path, dtype, {"train": 97})
    folder = cache_path(EmbedConfig.model_validate(data), "train")
    paired = load_cache_dir(folder)
    for rows, name in ((paired.image, "image.npy"), (paired.text, "text.npy")):
        reference = torch.from_numpy(np.load(folder / name).astype(np.float32))
        index = torch.from_numpy(np.random.default_rng(1).integers(0, len(reference), 64))
        got = rows.gather(index)
        assert got.dtype == torch.float32 and torch.equal(got, reference[index])
        buffer = torch.full((64, reference.shape[1]), float("nan"))
        assert rows.gather(index, out=buffer) is buffer and torch.equal(buffer, reference[index])
        assert torch.equal(torch.cat(list(rows.chunks(10))), reference)
        assert [len(c) for c in rows.chunks(10)] == [10] * (len(reference) // 10) + [len(reference) % 10]
        assert torch.equal(rows.to_tensor(), reference)
        view = rows.subset(torch.tensor([9, 2, 40, 2, 7]))
        assert len(view) == 5 and torch.equal(view.to_tensor(), reference[[9, 2, 40, 2, 7]])
        assert torch.equal(view.gather(torch.tensor([4, 0, 0])), reference[[7, 9, 9]])


# ---------------------------------------------------------------------------------------- reading ahead

def _pack_run(tmp_path: Path, data: dict, name: str) -> tuple[list[dict], dict[str, bytes]]:
    cfgs = [validate(TrainConfig, train_config(data, seed=seed, optim=optim,
                                               schedule={"steps": 40, "batch_size": 64, "warmup_steps": 4},
                                               eval={"every": 20, "sharpness_batches": 2, "hessian_iters": 3,
                                                     "hutchinson_samples": 2, "sharpness_ascent_steps": 1},
                                               checkpoint_every=20, loss_at_step=20))
            for seed, optim in ((0, {"name": "adamw", "lr": 1e-2}), (1, {"name": "msam", "lr": 1e-2, "rho": 0.2}))]
    dirs = [tmp_path / name / str(i) for i in range(len(cfgs))]
    results = train_pack(cfgs, dirs, progress=False)
    files = {f"{d.name}/{p.name}": re.sub(rb'"wall_time_s": [0-9.e-]+', b"", p.read_bytes())  # the clock's
             for d in dirs for p in [*sorted((d / "checkpoints").iterdir()), d / "metrics.jsonl"]}
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in results], files


def test_reading_ahead_gives_the_run_of_reading_each_step_when_it_starts(tmp_path, monkeypatch):
    """A pack of two seeds (two batches per step) trained with the rows read when each step starts, then with 1
    and 3 steps read ahead: the same results and checkpoint bytes; and the reads ahead did run in the background
    thread (the comparison is not between two identical code paths)."""
    data = make_cache(tmp_path / "cache")
    threads: list[str] = []
    real = EmbeddingRows.gather

    def gather(self, index, out=None):
        threads.append(threading.current_thread().name)
        return real(self, index, out)

    monkeypatch.setattr(EmbeddingRows, "gather", gather)
    runs = {}
    for depth in (0, 1, 3):
        monkeypatch.setattr(batches, "PREFETCH_STEPS", depth)
        threads.clear()
        runs[depth] = _pack_run(tmp_path, data, f"depth-{depth}")
        background = sum(name.startswith("align-batches") for name in threads)
        assert (background == 0) if depth == 0 else (background >= 2 * 2 * 39), (depth, background)
    assert runs[1] == runs[0] and runs[3] == runs[0]
    assert runs[0][0][0]["status"] == "done" and len([f for f in runs[0][1] if f.endswith(".safetensors")]) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh on one)")
def test_on_cuda_reading_ahead_into_pinned_buffers_gives_the_run_of_reading_each_step(tmp_path, monkeypatch):
    """The CUDA path: rows gathered into pinned host buffers (reused once their copy has completed) and copied
    without blocking, 3 steps ahead, against rows read when each step starts: the same results and checkpoints."""
    data = make_cache(tmp_path / "cache")
    pinned: list[bool] = []
    real = EmbeddingRows.gather

    def gather(self, index, out=None):
        pinned.append(out is not None and out.is_pinned())
        return real(self, index, out)

    monkeypatch.setattr(EmbeddingRows, "gather", gather)
    runs = {}
    for depth in (0, 3):
        monkeypatch.setattr(batches, "PREFETCH_STEPS", depth)
        cfg = validate(TrainConfig, train_config(data, device="cuda", precision="fp32",
                                                 optim={"name": "msam", "lr": 1e-2, "rho": 0.2},
                                                 eval={"every": 20, "sharpness": False}))
        result = train(cfg, tmp_path / f"depth-{depth}", progress=False)
        runs[depth] = ({k: v for k, v in result.items() if k not in ("wall_time_s",)},
                       load_file(tmp_path / f"depth-{depth}" / "checkpoints" / "step-0000120.safetensors"))
    assert runs[0][0] == runs[3][0] and sorted(runs[0][1]) == sorted(runs[3][1])
    assert all(torch.equal(runs[0][1][k], runs[3][1][k]) for k in runs[0][1])
    assert sum(pinned) >= 2 * 119  # the training batches went through pinned buffers


# ---------------------------------------------------------------------------------------- the blocks order

def _expected_blocks_epoch(sampler_input: tuple[torch.Tensor, int], seed: int, epoch: int,
                           block: int) -> tuple[list[int], list[int]]:
    """The blocks order re-implemented from its description: images with a caption in row order, cut into blocks
    of ``block``; the blocks in a random order; rows shuffled within each window of WINDOW_BLOCKS blocks of that
    order; then one caption per image, uniform among its own (the random order's draw)."""
    c2i, num_images = sampler_input
    captions: dict[int, list[int]] = {i: [] for i in range(num_images)}
    for j, i in enumerate(c2i.tolist()):
        captions[i].append(j)
    images = [i for i in range(num_images) if captions[i]]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    blocks = [images[a:a + block] for a in range(0, len(images), block)]
    shuffled = [blocks[b] for b in torch.randperm(len(blocks), generator=gen).tolist()]
    order = []
    for w in range(0, len(shuffled), WINDOW_BLOCKS):
        window = [i for b in shuffled[w:w + WINDOW_BLOCKS] for i in b]
        order += [window[k] for k in torch.randperm(len(window), generator=gen).tolist()]
    u = torch.rand(len(order), generator=gen)
    counts = torch.tensor([len(captions[i]) for i in order])
    picks = torch.minimum((u * counts).long(), counts - 1).tolist()
    return order, [captions[i][p] for i, p in zip(order, picks)]


def test_the_blocks_order_is_the_documented_one_and_shows_every_image_once_per_epoch():
    """1,001 images (three without a caption, uneven captions per image), blocks of 50, batches of 77: each epoch's
    batches are the re-implementation's order cut into batches, every image with a caption once per epoch (77
    divides the 998 images' 12 batches' worth, the remainder dropped), and a batch's images lie in the blocks of at
    most two windows: 8 of the 20 blocks of 50 consecutive images (a few stretches of the cache, where 77 rows drawn
    uniformly would touch nearly all 20). A split of one block is in the random order, bit for bit (a study on a
    small set gives the same numbers in either order)."""
    n, block, batch = 1001, 50, 77
    rng = np.random.default_rng(3)
    per_image = rng.integers(1, 4, size=n)
    per_image[[5, 500, 1000]] = 0
    c2i = torch.from_numpy(np.repeat(np.arange(n), per_image))
    sampler = Sampler(c2i, n, batch, seed=7, device=torch.device("cpu"), order="blocks", block_rows=block)
    images_with_captions = sorted(set(c2i.tolist()))
    rank = {image: k for k, image in enumerate(images_with_captions)}
    for epoch in range(3):
        order, captions = _expected_blocks_epoch((c2i, n), 7, epoch, block)
        assert sorted(order) == images_with_captions  # a permutation: every image once
        seen = []
        for b in range(sampler.per_epoch):
            rows_i, rows_t = sampler.batch(epoch * sampler.per_epoch + b)
            assert rows_i.tolist() == order[b * batch:(b + 1) * batch]
            assert rows_t.tolist() == captions[b * batch:(b + 1) * batch]
            assert all(int(c2i[t]) == i for i, t in zip(rows_i.tolist(), rows_t.tolist()))
            assert len({rank[i] // block for i in rows_i.tolist()}) <= 2 * WINDOW_BLOCKS  # one window, or two
            seen += rows_i.tolist()
        assert len(seen) == len(set(seen)) == sampler.per_epoch * batch
    random = Sampler(c2i, n, batch, seed=7, device=torch.device("cpu"))
    assert random.batch(0)[0].tolist() != sampler.batch(0)[0].tolist()
    one_block = Sampler(c2i, n, batch, seed=7, device=torch.device("cpu"), order="blocks", block_rows=n)
    assert all(torch.equal(a, b) for s in range(30) for a, b in zip(one_block.batch(s), random.batch(s)))


def test_a_blocks_run_interrupted_mid_epoch_resumes_to_the_same_bits(tmp_path, monkeypatch):
    """512 images in blocks of 64 at batch 64 (8 steps an epoch): a run stopped by an error at step 63 (mid-epoch,
    13 steps after its checkpoint at 50) and resumed ends with the uninterrupted run's checkpoint bytes."""
    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.1},
                                             schedule={"steps": 90, "batch_size": 64, "warmup_steps": 5,
                                                       "order": "blocks", "block_rows": 64},
                                             eval={"every": 20, "sharpness": False}, checkpoint_every=25))
    reference = train(cfg, tmp_path / "reference", progress=False)
    real = Trainer.after_step

    def stop_at_63(self):
        real(self)
        if self.pack_step == 63:
            raise RuntimeError("stopped")

    monkeypatch.setattr(Trainer, "after_step", stop_at_63)
    with pytest.raises(RuntimeError, match="stopped"):
        train(cfg, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(Trainer, "after_step", real)
    resumed = train(cfg, tmp_path / "stopped", resume=True, progress=False)
    assert {k: v for k, v in resumed.items() if k != "wall_time_s"} == \
        {k: v for k, v in reference.items() if k != "wall_time_s"}
    for name in ("step-0000090.safetensors", "best.safetensors"):
        ref, got = (load_file(d / "checkpoints" / name) for d in (tmp_path / "reference", tmp_path / "stopped"))
        assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref), name
    logs = [(tmp_path / run / "metrics.jsonl").read_bytes() for run in ("stopped", "reference")]
    assert logs[0] == logs[1]


def test_the_order_keys_enter_the_config_hash_only_away_from_their_defaults():
    """A run trained before schedule.order existed keeps its config hash (and resumes); the blocks order, or
    another block size, is another configuration."""
    base = train_config(data_section(Path("unused")))
    plain = hashed_config(validate(TrainConfig, base))
    assert "order" not in plain["schedule"] and "block_rows" not in plain["schedule"]
    blocks = hashed_config(validate(TrainConfig, train_config(data_section(Path("unused")),
                                                              schedule={"order": "blocks"})))
    assert blocks["schedule"]["order"] == "blocks" and "block_rows" not in blocks["schedule"]
    assert hashed_config(validate(TrainConfig, train_config(data_section(Path("unused")), schedule={
        "order": "blocks", "block_rows": 100})))["schedule"]["block_rows"] == 100


# ---------------------------------------------------------------------------------------- chunked evaluation

def test_validation_streamed_in_several_chunks_agrees_with_one_chunk(tmp_path, monkeypatch):
    """Three heads validated on 128 images and their captions with the rows read 64 at a time (3-4 chunks a side)
    against one chunk: features equal to float32 rounding and the same metrics. Not bit for bit: the matmul of a
    64-row chunk may take other BLAS kernels than one of all rows, summing each dot product in another order."""
    data = make_cache(tmp_path / "cache")
    cfg = validate(TrainConfig, train_config(data, image_dim=32, text_dim=24, head={"out_dim": 16}))
    val = load_cache_dir(cache_path(EmbedConfig.model_validate(data), "val"))
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(cfg.head, cfg.loss, 32, 24))
    pack = HeadPack(models, [head_hparams_of(cfg)] * 3, ["open_clip"] * 3)
    evaluator = RunEvaluator(cfg, RunData(train=val, val=val, test=None), torch.device("cpu"), models[0], "fp32")
    one = evaluator._encoded(pack, val.text, "text", slice(0, 3)), evaluator.validate(pack, [0, 1, 2])
    monkeypatch.setattr(embeddings, "CHUNK_ROWS", 64)
    assert len(list(val.text.chunks())) == math.ceil(val.num_captions / 64) >= 3
    several = evaluator._encoded(pack, val.text, "text", slice(0, 3)), evaluator.validate(pack, [0, 1, 2])
    torch.testing.assert_close(several[0], one[0], rtol=1e-6, atol=1e-7)
    for got, expected in zip(several[1], one[1]):
        assert got == pytest.approx(expected, abs=1e-6)
    assert SIZES["val"] == 128


def test_the_memory_model_counts_the_batches_in_flight_and_one_chunk_not_the_splits():
    """Batches of 8 rows of 32 + 24 values, the one computing and PREFETCH_STEPS read ahead (one more on CUDA: the
    device's copy), per group of heads of one seed, and one chunk of the validation rows (never more than
    CHUNK_ROWS) at the wider side; nothing grows with the training split."""
    from align.train.memory import data_memory

    cfg = validate(TrainConfig, train_config(data_section(Path("unused")), image_dim=32, text_dim=24,
                                             schedule={"batch_size": 8}))
    steps = batches.PREFETCH_STEPS + 1
    assert data_memory(cfg, eval_rows=100) == 4 * (steps * 8 * 56 + 100 * 32)
    assert data_memory(cfg, eval_rows=100, groups=3) == 4 * (3 * steps * 8 * 56 + 100 * 32)
    assert data_memory(cfg, eval_rows=10 ** 7, device=torch.device("cuda")) == \
        4 * ((steps + 1) * 8 * 56 + embeddings.CHUNK_ROWS * 32)
