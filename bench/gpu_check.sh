#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked tests, the head-training benchmark on the GPU (bf16 autocast), then the packed
# study benchmark (64 heads at once against one at a time), then out-of-core training from 100k and 1M-pair caches.
#
#   bash bench/gpu_check.sh                      # defaults: batches 1024 4096 16384, adamw and msam
#   bash bench/gpu_check.sh --batches 1024 8192  # extra arguments go to bench/bench_train.py
#
# Prints the device, the test summary and the benchmark table (samples/s, achieved GFLOP/s and its share of this
# GPU's bf16 and fp32 matmul speed measured in the same run). Needs the project's venv (PYTHON to override).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device here: bench/gpu_check.sh is for a CUDA machine (CPU checks: pytest; bench/bench_train.py)")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"{torch.cuda.device_count()} device(s)")
PYEOF

echo "== GPU-marked tests (pytest -m gpu)"
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests

echo "== head-training benchmark (bench/bench_train.py --device cuda)"
"$PY" bench/bench_train.py --device cuda "$@"

echo "== a study grid in packs against one cell at a time (bench/bench_study.py: 64 heads, 512-d, batch 1024)"
# Goal: >= 20x the cells per second of one cell at a time. Figures also go to $OUT/bench_study.json when OUT is set.
"$PY" bench/bench_study.py --synthetic --device cuda --heads 64 --dim 512 --batch 1024 --steps 100 --alone 8

echo "== out-of-core training on the GPU (bench/bench_scale.py: 100k and 1M random 512-d caches, batches to 32,768)"
# Pinned host buffers and non-blocking copies: the rows read for the next step overlap this step. Peak anonymous host
# memory and steps/s per size and batch; scratch on local disk, deleted at the end.
"$PY" bench/bench_scale.py --scratch "${TMPDIR:-/tmp}/align-bench-scale" --sizes 100000 1000000 --steps 30 \
  --batches 4096 16384 32768
