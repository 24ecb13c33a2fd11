"""The ALLoRA tuner: peft's `LoraModel` routing every layer type peft's LoRA supports to its ALLoRA layer."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .layer import (
    ALLoRACoefficientGroup,
    ALLoRAConv1d,
    ALLoRAConv2d,
    ALLoRAConv3d,
    ALLoRAEmbedding,
    ALLoRALayer,
    ALLoRALinear,
    ALLoRAMultiheadAttention,
    ALLoRAParamWrapper,
    _Registry,
)


_QUANTIZATION_PACKAGES = {"bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "eetq", "aqlm", "optimum", "torchao"}


class ALLoRAModel(LoraModel):
    """
    Creates an ALLoRA model from a pretrained transformers model
    ([paper](https://huggingface.co/papers/2410.09692)). Use it through `peft.get_peft_model` with an
    [`ALLoRAConfig`].

    Supported targets are those of peft's LoRA (without quantized layers): `nn.Linear`, transformers' `Conv1D`,
    `nn.Embedding`, `nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d`, `nn.MultiheadAttention` and `target_parameters`; the
    output row of each is defined in `regtune.tuners.allora.layer` and in the docs page (docs/allora.md).

    Example:

        ```py
        >>> import regtune  # registers ALLoRA with peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, regtune.ALLoRAConfig(r=8, eta=2.0, target_modules="all-linear"))
        ```
    """

    prefix: str = "lora_"

    def inject_adapter(self, *args, **kwargs) -> None:
        super().inject_adapter(*args, **kwargs)
        # the model's ALLoRA layers compute their row coefficients together, once per optimizer step
        layers = [module for module in self.model.modules() if isinstance(module, ALLoRALayer)]
        group = ALLoRACoefficientGroup(layers)
        _Registry.models[self] = group  # alive as long as this model
        for layer in layers:
            _Registry.groups[layer] = group

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        weight = getattr(base, "weight", None)
        quantized = type(base).__module__.split(".")[0] in _QUANTIZATION_PACKAGES or (
            isinstance(weight, torch.Tensor) and not (weight.dtype.is_floating_point or weight.device.type == "meta")
        )
        if quantized:
            raise ValueError(
                f"ALLoRA does not support quantized layers ({type(base).__module__}.{type(base).__name__}): it routes "
                "only unquantized nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and "
                "`target_parameters`. Remove it from `target_modules`, or load the base model unquantized."
            )
        parameter_name = kwargs.pop("parameter_name", None)
        if parameter_name is not None:
            return ALLoRAParamWrapper(
                target, adapter_name, parameter_name=parameter_name, config=lora_config, **kwargs
            )
        if isinstance(base, torch.nn.Embedding):
            return ALLoRAEmbedding(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, torch.nn.Conv2d):
            return ALLoRAConv2d(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, torch.nn.Conv3d):
            return ALLoRAConv3d(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, torch.nn.Conv1d):
            return ALLoRAConv1d(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, torch.nn.MultiheadAttention):
            return ALLoRAMultiheadAttention(target, adapter_name, config=lora_config, **kwargs)
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
            f"ALLoRA supports the layer types of peft's LoRA (torch.nn.Linear, transformers' Conv1D, nn.Embedding, "
            f"nn.Conv1d/2d/3d, nn.MultiheadAttention, and `target_parameters`), got {type(base).__name__}. Remove it "
            "from `target_modules`."
        )
