"""Argument checks shared by every public entry point (one place, one wording)."""

from __future__ import annotations

import math

__all__ = ("check_optional_seconds", "check_seconds")


def check_optional_seconds(value: object, what: str, *, positive: bool = False) -> float | None:
    """:func:`check_seconds`, but ``None`` passes through unchanged."""
    return None if value is None else check_seconds(value, what, positive=positive)


def check_seconds(
    value: object, what: str, *, positive: bool = False
) -> float:
    """Return ``value`` as seconds (a float), or raise an error naming ``what``.

    Accepts ints and floats (not bools); refuses NaN and infinities, negatives, and zero
    when ``positive``.

    Raises:
        TypeError: not a number.
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return seconds
