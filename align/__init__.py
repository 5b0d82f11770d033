"""align: align frozen vision and text encoders with sharpness-aware optimizers (SAM, Monge SAM and peers).

The packages follow the pipeline: ``data`` (datasets, frozen encoders) → ``cache`` (embeddings on disk) →
``train`` (heads, losses, the loop, run directories) → ``eval`` (a run or a cache measured from disk) → ``study``
(optimizer grids, statistics, reports). ``optim`` (the optimizers), ``metrics`` (pure measurements) and ``common``
(errors, configs, files, devices, ranks) serve them; ``toy`` runs the paper's 2-D experiments.

The Python API (``align.eval.trained``): ``align.load_run(RUN)`` → a trained run as a model (``encode_images``,
``encode_texts``), ``align.load_cache(KEY)`` → a cache's verified arrays; ``align.AlignError`` is what they raise.
They are imported on first use, so ``import align`` stays light (no torch).
"""
from importlib import import_module as _import_module

# name → the module that holds it (loaded when the name is first used)
_LAZY = {"load_run": "align.eval.trained", "load_cache": "align.eval.trained", "TrainedRun": "align.eval.trained",
         "AlignError": "align.common.errors"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'align' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
