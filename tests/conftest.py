"""Test-wide settings: never reach the network, keep hub caches in a temporary folder."""
import os
import tempfile

# Read by huggingface libraries at import time, so set before any test imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="align-hf-home-"))
os.environ.setdefault("MPLBACKEND", "Agg")
