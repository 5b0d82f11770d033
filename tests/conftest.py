"""Test-wide settings: never reach the network, keep hub caches in a temporary folder."""
import os
import tempfile

import pytest

# Read by huggingface libraries at import time, so set before any test imports them. Forced, not defaulted: a
# shell with HF_HUB_OFFLINE=0 (or its own HF_HOME full of downloads) must not let a test reach the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
os.environ.update(OFFLINE)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="align-hf-home-")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: OpenMP spin-waits cost ≈8× when cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
