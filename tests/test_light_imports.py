"""Importing the optimizers (or the hub rule) in a fresh interpreter loads no heavy library."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("open_clip", "transformers", "datasets", "faiss", "matplotlib", "huggingface_hub")


def loaded_after(statement: str) -> dict[str, bool]:
    """Which of torch and HEAVY are in sys.modules after running ``statement`` in a fresh interpreter."""
    code = f"import json, sys; {statement}; print(json.dumps({{m: m in sys.modules for m in {('torch', *HEAVY)!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", ["import align.optim", "from align.optim import MSAM",
                                       "from align.optim.step import take_step"])
def test_the_optimizers_load_torch_and_nothing_heavy(statement):
    loaded = loaded_after(statement)
    assert loaded.pop("torch") is True
    assert not [m for m, present in loaded.items() if present]


def test_the_offline_rule_loads_neither_torch_nor_a_hub_library():
    loaded = loaded_after("import align.data.hub")
    assert not [m for m, present in loaded.items() if present]


def test_validating_a_train_config_imports_the_cache_key_alone():
    """A train YAML names its cache through the embed config (``align.cache.key``); checking it must not load the
    embed writer, the verified reader or the store."""
    code = ("import json, sys; from align.train.config import TrainConfig; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('align.cache'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["align.cache", "align.cache.key"]
