"""Small argument checks shared by regtune's constructors: every bad field is collected, then one `ValueError`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def is_real(value: Any) -> bool:
    """Whether `value` is a finite real number (an `int` or a `float`, numpy's included; not a `bool`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """Whether `value` is an integer (`int` or numpy's; not a `bool`, not a float such as `2.0`)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_rate(value: Any, upper_inclusive: bool = True) -> bool:
    """Whether `value` is a probability: a finite real number in [0, 1] (or [0, 1) with `upper_inclusive=False`)."""
    return is_real(value) and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)


def str_subset(value: Any, allowed: Iterable[str]) -> tuple[str, ...] | None:
    """`value` as a non-empty tuple of names from `allowed` (a list, tuple, set...; not a bare string), else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    try:
        items = tuple(value)
    except TypeError:
        return None
    allowed = tuple(allowed)
    if not items or any(not isinstance(item, str) or item not in allowed for item in items):
        return None
    return items


def raise_field_errors(owner: str, errors: list[str]) -> None:
    """
    Raise one `ValueError` listing every problem in `errors` (one string per bad field, naming it and its allowed
    values), prefixed by `owner` (the class or function); do nothing when `errors` is empty.
    """
    if errors:
        count = f"{len(errors)} invalid arguments" if len(errors) > 1 else "invalid argument"
        raise ValueError(f"{owner}: {count}: " + "; ".join(errors) + ".")
