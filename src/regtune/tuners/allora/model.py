"""The ALLoRA tuner: peft's `LoraModel` routing `nn.Linear` / `Conv1D` targets to [`ALLoRALinear`]."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .layer import ALLoRALinear


class ALLoRAModel(LoraModel):
    """
    Creates an ALLoRA model from a pretrained transformers model
    ([paper](https://huggingface.co/papers/2410.09692)). Use it through `peft.get_peft_model` with an
    [`ALLoRAConfig`].

    Example:

        ```py
        >>> import regtune  # registers ALLoRA with peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, regtune.ALLoRAConfig(r=8, eta=2.0, target_modules="all-linear"))
        ```
    """

    prefix: str = "lora_"

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if kwargs.get("parameter_name") is not None:
            raise ValueError("ALLoRA does not support `target_parameters`; target nn.Linear or Conv1D modules.")
        if isinstance(base, torch.nn.Linear):
            if lora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False.",
                    stacklevel=2,
                )
                lora_config.fan_in_fan_out = False
            return ALLoRALinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            if not lora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.",
                    stacklevel=2,
                )
                lora_config.fan_in_fan_out = True
            return ALLoRALinear(target, adapter_name, is_target_conv_1d_layer=True, config=lora_config, **kwargs)
        raise ValueError(
            f"ALLoRA supports `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` targets, got {type(base).__name__}. "
            "Remove it from `target_modules`."
        )
