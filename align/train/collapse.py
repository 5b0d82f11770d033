"""Collapse to the uniform prediction (core: numbers in, numbers out): the uniform-prediction loss, when a step's
training loss lies on its plateau, and how long a plateau makes a run "collapsed".

The paper counts as diverged the runs whose logit scale collapses, so that the head predicts uniformly and the
loss sits at its uniform value L_u (ln B for CLIP). A step is on the uniform plateau when its training loss L has
|L − L_u| ≤ tol · L_u ("within 5%" at the default uniform_plateau_tol = 0.05: 0.24 around ln 128 = 4.85), whatever
its gradient; a run whose longest stretch of consecutive plateau steps reaches collapse_fraction of its
schedule.steps collapsed (``align.train.run`` counts the stretch, a study's report counts the runs).
"""
from __future__ import annotations

import math
from fractions import Fraction


def uniform_loss(kind: str, batch_size: int) -> float:
    """The loss when every logit is equal (a collapsed scale): CLIP ln B; SigLIP its best constant-logit value."""
    b = float(batch_size)
    if kind == "clip":
        return math.log(b)
    # SigLIP with all logits = c: −(log σ(c) + (B−1) log σ(−c)), minimised at σ(c) = 1/B.
    return -(math.log(1.0 / b) + (b - 1.0) * math.log(1.0 - 1.0 / b))


def on_plateau(loss: float, uniform: float, tol: float) -> bool:
    """Whether a training loss lies on the uniform plateau: |loss − uniform| ≤ tol · uniform (NaN: no)."""
    return abs(loss - uniform) <= tol * uniform


def collapse_steps(fraction: float, steps: int) -> int:
    """The shortest uniform plateau that makes a run of ``steps`` steps collapsed: ⌈fraction · steps⌉ computed on
    the decimal as written (0.1 · 300 is 30, not 31), at least 1."""
    return max(1, math.ceil(Fraction(repr(float(fraction))) * steps))
