"""Configuration of the ALLoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig
from peft.utils import PeftType


ALLORA_COEFFICIENT_TARGETS = ("gradient", "update")


@dataclass
class ALLoRAConfig(LoraConfig):
    """
    Configuration for ALLoRA: dropout-free, scaling-free LoRA with a norm-adaptive step
    ([paper](https://huggingface.co/papers/2410.09692)).

    The adapter computes `h = W x + B A x` (no `lora_alpha / r` scaling, no dropout). During backward, the gradients
    reaching `A` and `B` are scaled per output row `i` of `dW = B A` by `c_i = 1 / sqrt(||dW_i||^2 + 1/eta^2)`; the
    gradient flowing to earlier layers is not scaled. Everything else (target_modules patterns incl. `"all-linear"`,
    `layers_to_transform`, several adapters, `adapter_names` mixed batches, merging) is peft's LoRA.

    Args:
        eta (`float`, defaults to `2.0`):
            The row coefficient at `dW = 0`, i.e. the initial step multiplier (it replaces `lora_alpha / r`). The
            paper searched `eta^2` in {1, 2, 4}. Must be > 0. With SGD this is a step multiplier; under Adam(W) a
            slowly varying per-row gradient scale is largely normalized away, so with `coefficient_on="gradient"` the
            adapter trains almost exactly like LoRA with `lora_alpha=r` and no dropout (measured in docs/allora.md);
            `coefficient_on="update"` is the reading that changes Adam's dynamics.
        norm_squared (`bool`, defaults to `True`):
            Use `||dW_i||^2` (default, "inversely proportional to the l2 norm" for large rows) or the unsquared
            `||dW_i||` of a third-party reading.
        coefficient_on (`str`, defaults to `"gradient"`):
            `"gradient"`: the layer scales the gradients of `A` and `B` (the paper's description). `"update"`: the
            layer computes plain gradients and the optimizer made by [`create_allora_optimizer`] scales the
            parameter *update* instead (under Adam a per-row gradient scale is largely normalized away).
        lora_alpha (`int`, *optional*):
            Must be left unset (or equal to `r`): ALLoRA is scaling-free. It is stored as `r`, so `alpha / r = 1`.
        lora_dropout (`float`, defaults to `0.0`):
            Must be 0: ALLoRA is dropout-free.
    """

    eta: float = field(
        default=2.0,
        metadata={
            "help": "Row coefficient at dW = 0 (initial step multiplier), > 0. The paper searched eta^2 in {1, 2, 4}."
        },
    )
    norm_squared: bool = field(
        default=True, metadata={"help": "Use ||dW_i||^2 (default) or the unsquared ||dW_i|| in the row coefficient."}
    )
    coefficient_on: Literal["gradient", "update"] = field(
        default="gradient",
        metadata={
            "help": "'gradient': scale the gradients of A and B in backward (the paper). 'update': plain gradients, "
            "the optimizer from regtune.create_allora_optimizer scales the update."
        },
    )
    lora_alpha: int | None = field(
        default=None, metadata={"help": "Must be unset or equal to r: ALLoRA has no alpha/r scaling."}
    )

    def __post_init__(self):
        if self.lora_alpha is not None and self.lora_alpha != self.r:
            raise ValueError(
                f"ALLoRAConfig: `lora_alpha` must be unset (or equal to r={self.r}), got {self.lora_alpha}. ALLoRA is "
                "scaling-free: its row coefficient, set by `eta`, replaces the alpha/r factor."
            )
        if self.lora_dropout != 0.0:
            raise ValueError(
                f"ALLoRAConfig: `lora_dropout` must be 0.0, got {self.lora_dropout}. ALLoRA is dropout-free: the paper "
                "shows dropout is an unreliable regularizer on short schedules and slows the escape of B from 0."
            )
        for name in ("alpha_pattern", "rank_pattern"):
            if getattr(self, name):
                raise ValueError(
                    f"ALLoRAConfig: `{name}` is not supported (got {getattr(self, name)}); ALLoRA uses one rank `r` "
                    "and no alpha."
                )
        if self.use_rslora:
            raise ValueError("ALLoRAConfig: `use_rslora` must be False: rsLoRA is a scaling rule and ALLoRA has none.")
        if self.lora_bias:
            raise ValueError("ALLoRAConfig: `lora_bias` must be False: ALLoRA's row coefficient covers B A only.")
        if not (isinstance(self.eta, (int, float)) and self.eta > 0):
            raise ValueError(f"ALLoRAConfig: `eta` must be a number > 0, got {self.eta!r}.")
        if self.coefficient_on not in ALLORA_COEFFICIENT_TARGETS:
            raise ValueError(
                f"ALLoRAConfig: `coefficient_on` must be one of {ALLORA_COEFFICIENT_TARGETS}, got {self.coefficient_on!r}."
            )
        self.lora_alpha = self.r
        super().__post_init__()
        self.peft_type = PeftType.ALLORA
