"""regtune: regularization for the Hugging Face fine-tuning stack.

`import regtune` registers regtune's adapter types (`ALLORA`, `GLAD`, `MASK_TUNING`) with peft, so that
`peft.get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained` handle them like built-in
methods.
"""

__version__ = "0.1.0.dev0"

import importlib  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

# the adapter types are registered with peft on import
from .tuners.allora import ALLoRAConfig, ALLoRAModel, create_allora_optimizer  # noqa: E402 (registers ALLORA)
from .tuners.glad import GLADConfig, GLADModel, GLADSettings  # noqa: E402 (registers GLAD)
from .tuners.mask_tuning import MaskTuningConfig, MaskTuningModel, rank_modules_by_gradient  # noqa: E402


# imported on first use, so that `import regtune` (e.g. to load an adapter) does not import trl and the Trainer
_LAZY = {
    **dict.fromkeys(("export_as_lora", "export_merged"), ".export"),
    **dict.fromkeys(("ELR", "PSKD", "NoisyLabelMonitor", "Regularizer", "add_sample_index"), ".regularizers"),
    **dict.fromkeys(
        (
            "GLADTrainer",
            "GLADTrainingArguments",
            "LfUConfig",
            "LfUTrainer",
            "MaskTuningTrainer",
            "MaskTuningTrainingArguments",
            "RegTrainer",
            "RegularizedTrainerMixin",
        ),
        ".trainers",
    ),
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .export import export_as_lora, export_merged
    from .regularizers import ELR, PSKD, NoisyLabelMonitor, Regularizer, add_sample_index
    from .trainers import (
        GLADTrainer,
        GLADTrainingArguments,
        LfUConfig,
        LfUTrainer,
        MaskTuningTrainer,
        MaskTuningTrainingArguments,
        RegTrainer,
        RegularizedTrainerMixin,
    )


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ALLoRAConfig",
    "ALLoRAModel",
    "ELR",
    "GLADConfig",
    "GLADModel",
    "GLADSettings",
    "GLADTrainer",
    "GLADTrainingArguments",
    "LfUConfig",
    "LfUTrainer",
    "MaskTuningConfig",
    "MaskTuningModel",
    "MaskTuningTrainer",
    "MaskTuningTrainingArguments",
    "NoisyLabelMonitor",
    "PSKD",
    "RegTrainer",
    "Regularizer",
    "RegularizedTrainerMixin",
    "__version__",
    "add_sample_index",
    "create_allora_optimizer",
    "export_as_lora",
    "export_merged",
    "rank_modules_by_gradient",
]
