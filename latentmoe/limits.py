"""Numeric limits, stated once per setting and used by both the library's validation and the command line.

A settings dataclass declares each numeric field's range in its metadata::

    lr: float = field(default=2e-3, metadata=bounds(low=0, high=1, low_open=True))      # (0, 1]

``check_fields(obj, error)`` validates every declared field (finite, of the right kind, in range) and the
command line builds its argparse ``type=`` from the same :class:`Limit` (``latentmoe.cli.common.option_type``),
so ``--lr inf`` and ``TrainConfig(lr=inf)`` fail with the same words: ``lr must be in (0, 1], got inf``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

LIMIT_KEY = "limit"


@dataclass(frozen=True)
class Limit:
    """A closed or open interval, optionally integers only; None on a side means unbounded there."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # None is an allowed value (e.g. "not set: use the default rule")

    def describe(self) -> str:
        """``in (0, 1]``, ``>= 1``, ``an integer in [0, 100]``."""
        kind = "an integer " if self.integer else ""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind}in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{kind}{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{kind}{'<' if self.high_open else '<='} {_num(self.high)}"
        return "an integer" if self.integer else "a finite number"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` violates the limit (None when it does not)."""
        if value is None:
            return None if self.optional else "is required"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        if self.integer and not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                return f"must be {self.describe()}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.describe()}, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"must be {self.describe()}, got {_num(value)}"
        return None


def _num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def bounds(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> dict[str, Limit]:
    """Field metadata declaring a :class:`Limit` (see the module docstring)."""
    return {LIMIT_KEY: Limit(low, high, low_open, high_open, integer, optional)}


def field_limit(cls: type, name: str) -> Limit:
    """The :class:`Limit` declared for ``cls.name`` (KeyError when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name and LIMIT_KEY in f.metadata:
            return f.metadata[LIMIT_KEY]
    raise KeyError(f"{cls.__name__}.{name} declares no limit")


def check_fields(obj: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error("NAME must be ..., got ...")`` for the first declared field out of its limit."""
    for f in dataclasses.fields(obj):
        limit = f.metadata.get(LIMIT_KEY)
        if limit is not None and (problem := limit.problem(getattr(obj, f.name))) is not None:
            raise error(f"{f.name} {problem}")
