from regtune._compat import register_regtune_method

from .config import ALLoRAConfig
from .layer import ALLoRALinear, ALLoRALinearVariant
from .model import ALLoRAModel
from .optimizer import create_allora_optimizer


__all__ = ["ALLoRAConfig", "ALLoRALinear", "ALLoRALinearVariant", "ALLoRAModel", "create_allora_optimizer"]

register_regtune_method(name="allora", config_cls=ALLoRAConfig, model_cls=ALLoRAModel, prefix="lora_")
