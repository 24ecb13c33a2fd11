"""regtune's peft adapter types. Importing this package registers them with peft."""

from .allora import ALLoRAConfig, ALLoRAModel, create_allora_optimizer


__all__ = ["ALLoRAConfig", "ALLoRAModel", "create_allora_optimizer"]
