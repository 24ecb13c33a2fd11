"""The GLAD tuner: peft's `LoraModel` unchanged, under its own peft type."""

from __future__ import annotations

from peft.tuners.lora import LoraModel


class GLADModel(LoraModel):
    """
    peft's LoRA model registered as peft type `GLAD` ([paper](https://huggingface.co/papers/2507.13089)). The
    regularizer is applied by the trainer; see [`regtune.GLADTrainer`].

    Example:

        ```py
        >>> import regtune
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, regtune.GLADConfig(r=8))
        ```
    """

    prefix: str = "lora_"
