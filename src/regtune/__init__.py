"""regtune: regularization for the Hugging Face fine-tuning stack.

`import regtune` registers regtune's adapter types (`ALLORA`, `GLAD`, `MASK_TUNING`) with peft, so that
`peft.get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained` handle them like built-in
methods.
"""

__version__ = "0.1.0.dev0"

from .export import export_as_lora, export_merged  # noqa: E402
from .regularizers import Regularizer  # noqa: E402
from .trainers import (  # noqa: E402
    GLADTrainer,
    GLADTrainingArguments,
    LfUConfig,
    LfUTrainer,
    MaskTuningTrainer,
    MaskTuningTrainingArguments,
    RegTrainer,
    RegularizedTrainerMixin,
)
from .tuners.allora import ALLoRAConfig, ALLoRAModel, create_allora_optimizer  # noqa: E402 (registers ALLORA)
from .tuners.glad import GLADConfig, GLADModel, GLADSettings  # noqa: E402 (registers GLAD)
from .tuners.mask_tuning import MaskTuningConfig, MaskTuningModel, rank_modules_by_gradient  # noqa: E402


__all__ = [
    "ALLoRAConfig",
    "ALLoRAModel",
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
    "RegTrainer",
    "Regularizer",
    "RegularizedTrainerMixin",
    "__version__",
    "create_allora_optimizer",
    "export_as_lora",
    "export_merged",
    "rank_modules_by_gradient",
]
