"""regtune: regularization for the Hugging Face fine-tuning stack.

`import regtune` registers regtune's adapter types (`ALLORA`, `GLAD`, `MASK_TUNING`) with peft, so that
`peft.get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained` handle them like built-in
methods.
"""

__version__ = "0.1.0.dev0"

from .tuners import (  # noqa: E402 - registers the adapter types with peft
    ALLoRAConfig,
    ALLoRAModel,
    GLADConfig,
    GLADModel,
    MaskTuningConfig,
    MaskTuningModel,
    create_allora_optimizer,
)


__all__ = [
    "ALLoRAConfig",
    "ALLoRAModel",
    "GLADConfig",
    "GLADModel",
    "MaskTuningConfig",
    "MaskTuningModel",
    "__version__",
    "create_allora_optimizer",
]
