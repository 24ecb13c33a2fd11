"""Configuration of the GLAD adapter: peft's LoRA, recording the SAM-referenced regularizer's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig
from peft.utils import PeftType


@dataclass
class GLADConfig(LoraConfig):
    """
    Configuration for GLAD: LoRA trained with a gradient regularizer that uses the Sharpness-Aware Minimization
    gradient as a reference ([paper](https://huggingface.co/papers/2507.13089)).

    The adapter math is exactly peft's LoRA; this config adds the regularizer's knobs so that `adapter_config.json`
    records how the adapter was trained. Training with them is done by [`regtune.GLADTrainer`] (or the
    [`regtune.regularizers.GLADRegularizer`] in any regtune trainer), which reads them from this config by default.

    Args:
        rho (`float`, defaults to `0.05`):
            Radius of the SAM perturbation `eps = rho * g / ||g||`. Must be > 0.
        glad_lambda (`float`, defaults to `0.5`):
            Weight of the SAM reference: `g_final = g + glad_lambda * (g_sam - g)`. 0 is plain LoRA, 1 is SAM. Must
            be in [0, 1].
    """

    rho: float = field(default=0.05, metadata={"help": "SAM perturbation radius (> 0)."})
    glad_lambda: float = field(
        default=0.5, metadata={"help": "Weight of the SAM reference gradient in [0, 1]: 0 = LoRA, 1 = SAM."}
    )

    def __post_init__(self):
        if not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise ValueError(f"GLADConfig: `rho` must be a number > 0, got {self.rho!r}.")
        if not (isinstance(self.glad_lambda, (int, float)) and 0.0 <= self.glad_lambda <= 1.0):
            raise ValueError(f"GLADConfig: `glad_lambda` must be in [0, 1], got {self.glad_lambda!r}.")
        super().__post_init__()
        self.peft_type = PeftType.GLAD
