from regtune._compat import register_regtune_method

from ..training_hooks import AdapterTrainingHooks, register_training_hooks
from .config import ALLoRAConfig
from .layer import (
    ALLoRAConv1d,
    ALLoRAConv2d,
    ALLoRAConv3d,
    ALLoRAEmbedding,
    ALLoRALayer,
    ALLoRALinear,
    ALLoRALinearVariant,
    ALLoRAMultiheadAttention,
    ALLoRAParamWrapper,
    allora_adapters,
)
from .model import ALLoRAModel
from .optimizer import ALLoRAOptimizerError, attach_allora_update, create_allora_optimizer


__all__ = [
    "ALLoRAConfig",
    "ALLoRAConv1d",
    "ALLoRAConv2d",
    "ALLoRAConv3d",
    "ALLoRAEmbedding",
    "ALLoRALayer",
    "ALLoRALinear",
    "ALLoRALinearVariant",
    "ALLoRAModel",
    "ALLoRAMultiheadAttention",
    "ALLoRAOptimizerError",
    "ALLoRAParamWrapper",
    "allora_adapters",
    "attach_allora_update",
    "create_allora_optimizer",
]

register_regtune_method(name="allora", config_cls=ALLoRAConfig, model_cls=ALLoRAModel, prefix="lora_")
register_training_hooks(AdapterTrainingHooks("allora", prepare_optimizer=attach_allora_update))
