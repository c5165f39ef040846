"""Argument checks shared by the whole package.

Every public function validates its settings with these helpers, so the same mistake gets
the same message everywhere: what was received, what was expected.

>>> check_int("m", 3)
3
>>> check_int("m", 0)
Traceback (most recent call last):
    ...
ValueError: m must be an integer >= 1, got 0
>>> check_number("beta", 0.5, lo=0.0, hi=1.0, low_open=True)
0.5
>>> check_number("tol", float("nan"), lo=0.0, low_open=True)
Traceback (most recent call last):
    ...
ValueError: tol must be a finite number in (0.0, inf), got nan
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, lo: int = 1, hi: Optional[int] = None, hint: str = "") -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[lo, hi]``, else raise.

    The message reads ``"<name> must be an integer >= <lo>, got <value>"`` (or ``in [lo, hi]``);
    ``hint`` (what the number means, or the fix) goes in parentheses before ``got``.
    """
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {want}{_paren(hint)}, got {value!r}")
    return value


def check_ints(name: str, values: Iterable[Any], lo: int = 1) -> tuple:
    """Check a non-empty sequence of integers, each ``>= lo``; return it as a tuple."""
    values = tuple(values)
    if not values or not all(is_int(v) and v >= lo for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {lo}, got {values!r}")
    return values


def check_number(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """Return ``value`` if it is a finite real number (not a ``bool``) in the given interval.

    ``low_open``/``high_open`` exclude the end points. The message names the interval.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if low_open else value >= lo) and (value < hi if high_open else value <= hi)
    if not ok:
        lb, rb = ("(" if low_open else "["), (")" if high_open or hi == math.inf else "]")
        raise ValueError(f"{name} must be a finite number in {lb}{lo}, {hi}{rb}{_paren(hint)}, got {value!r}")
    return value


def _paren(hint: str) -> str:
    return f" ({hint})" if hint else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else a ``ValueError`` that lists them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value
