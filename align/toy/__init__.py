"""The paper's 2-D experiments (banana, sinc, paraboloid, stability, the grid of starts) with the real optimizer
classes, and their figures.

Imports ``align.optim`` and ``align.common``.
"""
