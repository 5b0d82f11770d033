"""Evaluating from disk: a trained run's heads or a cache's raw embeddings on a split, with confusion matrices and
retrieval galleries as PNGs.

Imports ``align.train``, ``align.metrics``, ``align.cache``, ``align.data`` and ``align.common``.
"""
