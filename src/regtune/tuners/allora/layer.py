"""ALLoRA layers: peft's `lora.Linear` with a LoRA variant that removes scaling and rescales A/B gradients."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant

from regtune.functional.allora import allora_lora_forward


class ALLoRALinearVariant(LoraVariant):
    """The ALLoRA forward: `result + B A x`, with the row-coefficient backward of
    [`regtune.functional.allora_lora_forward`] when `coefficient_on="gradient"`.

    Merging is vanilla LoRA's: the adapter's delta is exactly `B A` (scaling 1).
    """

    @staticmethod
    def init(module: ALLoRALinear, adapter_name: str, config=None, **kwargs) -> None:
        module.scaling[adapter_name] = 1.0
        module.allora_eta[adapter_name] = float(config.eta)
        module.allora_norm_squared[adapter_name] = bool(config.norm_squared)
        module.allora_scale_gradients[adapter_name] = config.coefficient_on == "gradient"

    @staticmethod
    def merge_safe(module: ALLoRALinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: ALLoRALinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: ALLoRALinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: ALLoRALinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        weight_A = module.lora_A[active_adapter].weight
        weight_B = module.lora_B[active_adapter].weight
        needs_grad = torch.is_grad_enabled() and (weight_A.requires_grad or weight_B.requires_grad)
        if module.allora_scale_gradients[active_adapter] and needs_grad:  # inference: plain B A x, no coefficient
            delta = allora_lora_forward(
                x, weight_A, weight_B, module.allora_eta[active_adapter], module.allora_norm_squared[active_adapter]
            )
        else:
            delta = module.lora_B[active_adapter](module.lora_A[active_adapter](x))
        return result + delta


class ALLoRALinear(LoraLinear):
    """peft's `lora.Linear` (also wraps GPT-2 `Conv1D` with `fan_in_fan_out`) whose only variant is ALLoRA.

    Any other LoRA variant requested in the config (DoRA, ...) is rejected by peft's variant resolution.
    """

    other_param_names = LoraLinear.other_param_names + (
        "allora_eta",
        "allora_norm_squared",
        "allora_scale_gradients",
    )

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        # these must exist before LoraLinear.__init__ calls update_layer -> variant.init
        self.allora_eta: dict[str, float] = {}
        self.allora_norm_squared: dict[str, bool] = {}
        self.allora_scale_gradients: dict[str, bool] = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): ALLoRALinearVariant}

    def __repr__(self) -> str:
        return "allora." + super().__repr__().removeprefix("lora.")
