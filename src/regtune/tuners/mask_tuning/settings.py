"""Mask tuning's settings in one place: defaults, help texts and validation of every knob.

[`MaskTuningConfig`], [`regtune.MaskTuningTrainingArguments`], [`regtune.regularizers.MaskScorePenalty`] and
[`regtune.regularizers.GradientDropout`] take their defaults from `DEFAULTS` and validate with [`check_fields`], so a
knob has one default, one allowed range and one error message wherever it is set (adapter config, trainer config,
regularizer or recipe). See docs/mask_tuning.md for what each knob does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


DEFAULTS: dict[str, Any] = {
    "score_init": 1e-2,
    "threshold": 5e-3,
    "score_l2_weight": 1e-4,
    "graddrop_lambda": 1.0,
    "graddrop_temperature": 1.0,
}
"""The defaults of R-AMT's knobs (the released code's: scores start at 1e-2, threshold 5e-3, score penalty 1e-4,
gradient-dropout strength 1.0, knowledge temperature 1)."""

HELP: dict[str, str] = {
    "score_init": "Initial value of every score; a finite number greater than `threshold` (the mask starts as all ones).",
    "threshold": "A weight is kept where its score is above it; a finite number.",
    "score_l2_weight": "Weight of the score penalty sum_l ||S_l||_2 added to the training loss; a finite number >= 0.",
    "graddrop_lambda": "Gradient-dropout strength, a number in [0, 1]; 0 turns gradient dropout off.",
    "graddrop_temperature": "Temperature of the knowledge loss (soft cross-entropy to the teacher); a finite number > 0.",
}

# (lower bound, lower bound included, upper bound, upper bound included); None = unbounded
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "score_init": (None, False, None, False),
    "threshold": (None, False, None, False),
    "score_l2_weight": (0.0, True, None, False),
    "graddrop_lambda": (0.0, True, 1.0, True),
    "graddrop_temperature": (0.0, False, None, False),
}


def allowed(name: str) -> str:
    """The allowed values of a numeric knob, in words (used in every error message)."""
    low, low_in, high, high_in = _RANGES[name]
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>=' if low_in else '>'} {low:g}"
    if low is None:
        return f"a finite number {'<=' if high_in else '<'} {high:g}"
    return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def is_number(value: Any) -> bool:
    """A real number (Python or NumPy) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value: Any, *, optional: bool = False, label: str | None = None) -> str | None:
    """
    The error message for a numeric knob `name` (a key of `DEFAULTS`) holding `value`, or `None` if it is valid.
    `label` is the field's name where it is called otherwise (e.g. a deprecated spelling).
    """
    if value is None and optional:
        return None
    shown = label or name
    if not is_number(value):
        return f"`{shown}` must be {allowed(name)}{' or None' if optional else ''}, got {value!r}"
    number = float(value)
    low, low_in, high, high_in = _RANGES[name]
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number >= low if low_in else number > low
    if ok and high is not None:
        ok = number <= high if high_in else number < high
    return None if ok else f"`{shown}` must be {allowed(name)}{' or None' if optional else ''}, got {value!r}"


def check_fields(values: Mapping[str, Any], *, optional: tuple[str, ...] = ()) -> list[str]:
    """
    Validate R-AMT's numeric knobs present in `values` (names of `DEFAULTS`) and their relation
    (`score_init > threshold`). Returns every error message (empty when all are valid); `optional` names may be None.
    """
    errors = [
        msg
        for name in DEFAULTS
        if name in values and (msg := check_number(name, values[name], optional=name in optional))
    ]
    init, threshold = values.get("score_init"), values.get("threshold")
    if (
        "score_init" in values
        and "threshold" in values
        and not any(f"`{n}`" in e for e in errors for n in ("score_init", "threshold"))
        and init is not None
        and threshold is not None
        and not float(init) > float(threshold)
    ):
        errors.append(
            f"`score_init` ({init!r}) must be greater than `threshold` ({threshold!r}), so that the mask starts as all "
            "ones (the pre-trained model)"
        )
    return errors


def raise_if_errors(owner: str, errors: list[str]) -> None:
    """Raise one `ValueError` naming every bad field of `owner` (a class name), or do nothing."""
    if errors:
        listed = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(f"{owner}: {len(errors)} invalid field(s):\n{listed}\n(see docs/mask_tuning.md)")


def check_str_list(name: str, value: Any, *, allow_none: bool = True) -> str | None:
    """`value` must be None, a string (a regex or a name), or a list/set/tuple of strings."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return None
    if isinstance(value, (list, set, tuple, frozenset)) and all(isinstance(v, str) for v in value):
        return None
    return f"`{name}` must be None, a string or a list of strings, got {value!r}"


def check_bool(name: str, value: Any) -> str | None:
    """`value` must be a bool."""
    return None if isinstance(value, bool) else f"`{name}` must be True or False, got {value!r}"
