"""Optimizer studies: the grid, its cells and its config, packing cells under a memory budget, worker processes,
the study folder (``StudyDir``), statistics, tables, plots and report.md.

Imports ``align.train``, ``align.eval``, ``align.metrics``, ``align.cache``, ``align.data``, ``align.optim`` and
``align.common``.
"""
