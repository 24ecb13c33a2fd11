"""regtune's peft adapter types. Importing this package registers them with peft."""

from .allora import ALLoRAConfig, ALLoRAModel, create_allora_optimizer
from .glad import GLADConfig, GLADModel, GLADSettings
from .mask_tuning import MaskTuningConfig, MaskTuningModel


__all__ = [
    "ALLoRAConfig",
    "ALLoRAModel",
    "GLADConfig",
    "GLADModel",
    "GLADSettings",
    "MaskTuningConfig",
    "MaskTuningModel",
    "create_allora_optimizer",
]
