"""Composable regularizers for any `transformers.Trainer` subclass (see [`RegularizedTrainerMixin`]).

Build one by name (as recipes do) with [`build_regularizer`], or instantiate the class directly.
"""

from __future__ import annotations

import inspect

from .base import Regularizer
from .dropout_schedule import DropoutSchedule, DropoutScheduleCallback
from .glad import GLADRegularizer
from .lfu import LfURegularizer
from .mask_tuning import GradientDropout, MaskScorePenalty
from .multi_sample_dropout import MultiSampleDropout


REGULARIZERS: dict[str, type[Regularizer]] = {
    MultiSampleDropout.name: MultiSampleDropout,
    DropoutSchedule.name: DropoutSchedule,
    GLADRegularizer.name: GLADRegularizer,
    LfURegularizer.name: LfURegularizer,
    MaskScorePenalty.name: MaskScorePenalty,
    GradientDropout.name: GradientDropout,
}


def build_regularizer(type: str, **kwargs) -> Regularizer:  # noqa: A002 - `type` is the recipe key
    """
    Build a registered regularizer from its name and constructor arguments.

    Example:

    ```py
    >>> build_regularizer("dropout_schedule", p=0.1, mode="step", start_fraction=0.5)
    DropoutSchedule(p=0.1, mode='step', start_p=0.0)
    ```

    Args:
        type (`str`): a key of [`REGULARIZERS`] (`"multi_sample_dropout"`, `"dropout_schedule"`, `"glad"`, `"mask_score_penalty"`, `"gradient_dropout"`).
        **kwargs: the regularizer's constructor arguments; each constructor validates its own.

    Raises:
        `ValueError`: for an unknown `type` (the message lists the allowed names), or an invalid argument (the message
            names the field and the allowed values).
    """
    if type not in REGULARIZERS:
        raise ValueError(f"Unknown regularizer type {type!r}; allowed: {sorted(REGULARIZERS)}.")
    cls = REGULARIZERS[type]
    try:
        return cls(**kwargs)
    except TypeError as err:
        # an unknown keyword: say which regularizer and which fields it takes
        fields = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        raise ValueError(f"Invalid arguments for regularizer {type!r}: {err}. Allowed fields: {fields}.") from err


__all__ = [
    "REGULARIZERS",
    "DropoutSchedule",
    "DropoutScheduleCallback",
    "GLADRegularizer",
    "GradientDropout",
    "LfURegularizer",
    "MaskScorePenalty",
    "MultiSampleDropout",
    "Regularizer",
    "build_regularizer",
]
