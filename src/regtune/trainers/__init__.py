"""Training integration: the regularizer mixin for any `transformers.Trainer` subclass, and the named trainers."""

from .glad_trainer import GLADTrainer, GLADTrainingArguments
from .lfu_trainer import LfUConfig, LfUTrainer
from .mask_tuning_trainer import MaskTuningTrainer, MaskTuningTrainingArguments
from .mixin import (
    NONFINITE_ACTIONS,
    REGULARIZERS_STATE_NAME,
    NonFiniteLossError,
    RegularizedTrainerMixin,
    RegularizerStateError,
    check_regularizers,
)
from .reg_trainer import RegTrainer


__all__ = [
    "NONFINITE_ACTIONS",
    "REGULARIZERS_STATE_NAME",
    "NonFiniteLossError",
    "RegularizerStateError",
    "GLADTrainer",
    "GLADTrainingArguments",
    "LfUConfig",
    "LfUTrainer",
    "MaskTuningTrainer",
    "MaskTuningTrainingArguments",
    "RegTrainer",
    "RegularizedTrainerMixin",
    "check_regularizers",
]
