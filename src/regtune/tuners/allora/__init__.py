from regtune._compat import register_regtune_method

from ..training_hooks import AdapterTrainingHooks, register_training_hooks
from .config import ALLoRAConfig
from .layer import ALLoRALayer, allora_adapters  # the layer classes: regtune.tuners.allora.layer
from .model import ALLoRAModel
from .optimizer import ALLoRAOptimizerError, attach_allora_update, create_allora_optimizer


__all__ = [
    "ALLoRAConfig",
    "ALLoRALayer",
    "ALLoRAModel",
    "ALLoRAOptimizerError",
    "allora_adapters",
    "attach_allora_update",
    "create_allora_optimizer",
]

register_regtune_method(name="allora", config_cls=ALLoRAConfig, model_cls=ALLoRAModel, prefix="lora_")
register_training_hooks(AdapterTrainingHooks("allora", prepare_optimizer=attach_allora_update))
