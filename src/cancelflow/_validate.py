"""Argument checks shared by every public entry point (one place, one wording)."""

from __future__ import annotations

import math

__all__ = ("check_optional_seconds", "check_seconds", "seconds_error")


def check_seconds(
    value: object,
    what: str,
    *,
    positive: bool = False,
    finite: bool = True,
    noun: str = "a number of seconds",
) -> float:
    """Return ``value`` as seconds (a float), or raise an error naming ``what``.

    Accepts ints and floats (not bools); refuses NaN, negatives, infinities (unless not
    ``finite``), and zero when ``positive``. ``noun`` is what the ``TypeError`` says
    ``what`` must be.

    Raises:
        TypeError: not a number.
        ValueError: out of range.
    """
    error = seconds_error(value, what, positive=positive, finite=finite, noun=noun)
    if isinstance(error, TypeError):
        raise error
    # Converted before a range error is raised, as it always was: an int too large for
    # a float raises OverflowError here, whatever its sign.
    seconds = float(value)  # type: ignore[arg-type]  # an int or a float: checked above
    if error is not None:
        raise error
    return seconds


def check_optional_seconds(
    value: object, what: str, *, positive: bool = False, finite: bool = True
) -> float | None:
    """:func:`check_seconds`, but ``None`` passes through unchanged (and the messages say
    ``... or None``)."""
    if value is None:
        return None
    error = seconds_error(value, what, positive=positive, finite=finite, or_none=True)
    if error is not None:
        raise error
    return float(value)  # type: ignore[arg-type]  # an int or a float: checked above


def seconds_error(
    value: object,
    what: str,
    *,
    positive: bool = False,
    finite: bool = True,
    noun: str = "a number of seconds",
    or_none: bool = False,
) -> TypeError | ValueError | None:
    """The error :func:`check_seconds` raises for ``value``, or ``None`` if it is good.

    For a caller that raises an error of its own kind, or keeps the value as given.
    ``or_none``: the messages say ``... or None`` (the caller lets ``None`` through).
    The checks compare ``value`` as given, so an int too large for a float is judged
    by its sign (converting it is the caller's business).
    """
    alternative = " or None" if or_none else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return TypeError(f"{what} must be {noun}{alternative}, not {type(value).__name__}")
    if (
        value != value  # NaN (math.isnan would overflow on a huge int)
        or value < 0
        or (positive and value == 0)
        or (finite and value == math.inf)
    ):
        number = "a finite number " if finite else ""
        bound = "> 0" if positive else ">= 0"
        return ValueError(f"{what} must be {number}{bound}{alternative}, got {value!r}")
    return None
