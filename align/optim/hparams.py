"""What the registry says about one hyper-parameter of a method (core): its name, symbol, default and range.

A method's file declares its ``Hparam`` s once; the class reads its constructor defaults and checks from them, the
registry lists them, and everything else (the training config's keys, the study's grid axes, the tables' column
labels, the per-head hyper-parameters of a pack) is derived from the registry. No names are spelled here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hparam:
    """One hyper-parameter of a method: config key, symbol (tables, plots), default, range, grid axis or not.

    Numbers lie in [low, high] (an end that is None is open-ended; ``low_open``/``high_open`` exclude the end);
    ``integer`` asks for a whole number; ``choices`` makes it a word from a fixed list (no range). ``axis``: a
    study grid may sweep it (``grid.method_axes``); ρ is swept by ``grid.rhos`` instead.
    """

    name: str
    symbol: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    choices: tuple[str, ...] | None = None
    axis: bool = True

    @property
    def numeric(self) -> bool:
        """A number (a float or a whole number), as opposed to a word from ``choices``."""
        return self.choices is None

    def range_text(self) -> str:
        """The allowed values in words: 'a finite number >= 0', 'in [0, 1)', 'a whole number >= 1', 'one of ...'."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        kind = "a whole number" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def check(self, value: Any, owner: str = "") -> Any:
        """``value`` if allowed (ints as int, other numbers as float), else ValueError naming it and its range."""
        where = f"{owner}: " if owner else ""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{where}{self.name} must be {self.range_text()}, got {value!r}")
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.integer:
            ok = float(value).is_integer()
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ValueError(f"{where}{self.name} must be {self.range_text()}, got {value!r}")
        return int(value) if self.integer else float(value)
