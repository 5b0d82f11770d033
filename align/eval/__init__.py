"""Evaluating from disk: a trained run's heads or a cache's raw embeddings on a split, with confusion matrices and
retrieval galleries as PNGs; a trained run as a model in Python (``align.load_run``, ``align.load_cache``) and
text-to-image search through its heads (``align search``).

Imports ``align.train``, ``align.metrics``, ``align.cache``, ``align.data`` and ``align.common``.
"""
