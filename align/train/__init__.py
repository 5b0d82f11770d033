"""Training heads on cached embeddings: the run config (and what identifies it), heads and losses, the run's
optimizer, packs of K heads as one computation, run data (sampler, holdout, dims, schedule), the memory model,
the checkpoint codec, run directories and the experiment trackers they report to, one run's bookkeeping,
evaluation and results, and the loop.

Imports ``align.optim``, ``align.metrics``, ``align.cache``, ``align.data`` and ``align.common``.
"""
