"""Training heads on cached embeddings: the run config, heads and losses, packs of K heads as one computation,
run data (sampler, holdout, dims, schedule), the memory model, the checkpoint codec, run directories and the loop.

Imports ``align.optim``, ``align.metrics``, ``align.cache``, ``align.data`` and ``align.common``.
"""
