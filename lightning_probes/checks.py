"""Argument checks shared by every probe, model and command: one wording, naming the argument and the value.

Example:
    >>> check_positive_int("every_n_steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: Expected `every_n_steps` to be a positive integer, but got 0
"""

from __future__ import annotations

import math
from typing import Any, Optional


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer{' or None' if allow_none else ''}, "
                         f"but got {value!r}")


def check_float(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number inside the given interval.

    Args:
        name: Argument name, for the message.
        value: The value to check.
        low: Lower bound, or ``None`` for none.
        high: Upper bound, or ``None`` for none.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"Expected `{name}` to be a finite number in {interval}, but got {value!r}")


def check_fraction(name: str, value: Any, low_open: bool = True, high_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` lies in the interval (0, 1) with the given openness."""
    check_float(name, value, 0.0, 1.0, low_open, high_open)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}")
