"""Test-wide settings (never reach the network, keep hub caches in a temporary folder) and the fixtures several
test modules share. The helpers they are built from are in helpers.py."""
import atexit
import os
import shutil
import tempfile

import pytest

# Read by huggingface libraries at import time, so set before any test imports them. Forced, not defaulted: a
# shell with HF_HUB_OFFLINE=0 (or its own HF_HOME full of downloads) must not let a test reach the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
os.environ.update(OFFLINE)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="align-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)  # one per session, not one left per run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: OpenMP spin-waits cost ≈8× when cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random open_clip model saved as local-dir (config + safetensors), read-only: loadable in any process."""
    # Imported here, after the environment above is set: helpers imports align.
    from helpers import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=3)


@pytest.fixture(scope="session")
def cache_data(tmp_path_factory) -> dict:
    """helpers.make_cache's train/val/test embeddings (no encoder), read-only → the data section pointing at them."""
    # Imported here, after the environment above is set: helpers imports align.
    from helpers import make_cache

    return make_cache(tmp_path_factory.mktemp("cache"))
