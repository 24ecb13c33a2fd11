"""regtune: regularization for the Hugging Face fine-tuning stack.

`import regtune` registers regtune's adapter types (`ALLORA`, ...) with peft, so that `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained` handle them like built-in methods.
"""

from .tuners import ALLoRAConfig, ALLoRAModel, GLADConfig, GLADModel, create_allora_optimizer


__version__ = "0.1.0.dev0"

__all__ = ["ALLoRAConfig", "ALLoRAModel", "GLADConfig", "GLADModel", "create_allora_optimizer", "__version__"]
