"""Composable regularizers for any `transformers.Trainer` subclass (see [`RegularizedTrainerMixin`]).

Build one by name (as recipes do) with [`build_regularizer`], or instantiate the class directly.
"""

from __future__ import annotations

import builtins
import importlib
import inspect

from .allora_diagnostics import ALLoRADiagnostics
from .base import Regularizer
from .dropout_schedule import DropoutSchedule, DropoutScheduleCallback
from .elr import ELR
from .glad import GLADRegularizer
from .lfu import LfURegularizer
from .mask_tuning import GradientDropout, MaskFlipMonitor, MaskScorePenalty
from .multi_sample_dropout import MultiSampleDropout
from .noisy_label_monitor import NoisyLabelMonitor
from .per_example import PerExampleBuffer, PerExampleRegularizer, add_sample_index
from .pskd import PSKD


REGULARIZERS: dict[str, type[Regularizer]] = {
    MultiSampleDropout.name: MultiSampleDropout,
    DropoutSchedule.name: DropoutSchedule,
    GLADRegularizer.name: GLADRegularizer,
    LfURegularizer.name: LfURegularizer,
    MaskScorePenalty.name: MaskScorePenalty,
    GradientDropout.name: GradientDropout,
    ELR.name: ELR,
    PSKD.name: PSKD,
    NoisyLabelMonitor.name: NoisyLabelMonitor,
}
"""The regularizers [`build_regularizer`] (and a recipe's `regularizers:` list) can build by name."""


def is_import_path(name: str) -> bool:
    """Whether a regularizer (or trainer) name is an import path (`my_pkg.module:MyRegularizer` or
    `my_pkg.module.MyRegularizer`) rather than a registered name."""
    return isinstance(name, str) and (":" in name or "." in name)


def regularizer_class(type: str) -> type[Regularizer]:  # noqa: A002 - `type` is the recipe key
    """
    The [`Regularizer`] subclass named by `type`: a key of [`REGULARIZERS`], or an import path
    `my_pkg.module:MyRegularizer` (or `my_pkg.module.MyRegularizer`), imported here.

    Raises:
        `ValueError`: for an unknown name (listing the registered ones), a path that cannot be imported, or an
            object that is not a `Regularizer` subclass.
    """
    if isinstance(type, str) and type in REGULARIZERS:
        return REGULARIZERS[type]
    if not is_import_path(type):
        raise ValueError(
            f"Unknown regularizer type {type!r}; allowed: {sorted(REGULARIZERS)}, or an import path "
            "'my_pkg.module:MyRegularizer'."
        )
    module_name, _, attr = type.rpartition(":") if ":" in type else type.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"Regularizer type {type!r}: cannot import it ({e}).") from None
    if not (isinstance(cls, builtins.type) and issubclass(cls, Regularizer)):
        raise ValueError(f"Regularizer type {type!r} is not a regtune.regularizers.Regularizer subclass.")
    return cls


def build_regularizer(type: str, **kwargs) -> Regularizer:  # noqa: A002 - `type` is the recipe key
    """
    Build a registered regularizer from its name and constructor arguments.

    Example:

    ```py
    >>> build_regularizer("dropout_schedule", p=0.1, mode="step", start_fraction=0.5)
    DropoutSchedule(p=0.1, mode='step', start_p=0.0)
    ```

    Args:
        type (`str`): an import path (`"my_pkg.module:MyRegularizer"`) or a key of [`REGULARIZERS`]
            (`"multi_sample_dropout"`, `"dropout_schedule"`, `"glad"`, `"lfu"`,
            `"mask_score_penalty"`, `"gradient_dropout"`, `"elr"`, `"pskd"`, `"noisy_labels"`).
        **kwargs: the regularizer's constructor arguments; each constructor validates its own.

    Raises:
        `ValueError`: for an unknown `type` (the message lists the allowed names), an unknown or missing field (the
            message lists the allowed fields), or invalid values (the message names every bad field and its allowed
            values).
    """
    cls = regularizer_class(type)
    parameters = inspect.signature(cls.__init__).parameters.values()
    fields = [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"Invalid arguments for regularizer {type!r}: unknown field(s) {unknown}. Allowed fields: {fields}."
        )
    try:
        return cls(**kwargs)
    except TypeError as err:
        # a missing required argument (or a constructor that let a bad type through): say which regularizer and which
        # fields it takes
        raise ValueError(f"Invalid arguments for regularizer {type!r}: {err}. Allowed fields: {fields}.") from err


__all__ = [
    "REGULARIZERS",
    "ALLoRADiagnostics",
    "DropoutSchedule",
    "DropoutScheduleCallback",
    "ELR",
    "GLADRegularizer",
    "GradientDropout",
    "LfURegularizer",
    "MaskFlipMonitor",
    "MaskScorePenalty",
    "MultiSampleDropout",
    "NoisyLabelMonitor",
    "PSKD",
    "PerExampleBuffer",
    "PerExampleRegularizer",
    "Regularizer",
    "add_sample_index",
    "build_regularizer",
    "is_import_path",
    "regularizer_class",
]
