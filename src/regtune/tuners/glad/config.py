"""Configuration of the GLAD adapter: peft's LoRA, recording the [`GLADSettings`] it was trained with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig
from peft.utils import PeftType

from regtune._deprecation import training_knob_in_adapter_config

from .settings import SETTINGS_FIELDS, GLADSettings, bool_error, number_error, raise_field_errors, settings_field


def _modules_error(name: str, value: Any, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value):
        return None
    allowed = "None, a module name or regex string, or a list of module names"
    return f"`{name}` = {value!r} (allowed: {allowed})"


def lora_field_errors(config: LoraConfig) -> list[str]:
    """The validation errors of the LoRA fields of `config` that peft itself does not check (type, range,
    finiteness), each naming the field and its allowed values."""
    errors = [
        number_error("r", config.r, low=0, low_open=True, integer=True),
        number_error("lora_alpha", config.lora_alpha, low=0.0, low_open=True),
        number_error("lora_dropout", config.lora_dropout, low=0.0, high=1.0, high_open=True),
        _modules_error("target_modules", config.target_modules),
        _modules_error("modules_to_save", config.modules_to_save),
        bool_error("fan_in_fan_out", config.fan_in_fan_out),
        bool_error("use_rslora", config.use_rslora),
        bool_error("use_dora", config.use_dora),
    ]
    if config.bias not in ("none", "all", "lora_only"):
        errors.append(f"`bias` = {config.bias!r} (allowed: 'none', 'all', 'lora_only')")
    return [error for error in errors if error]


@dataclass
class GLADConfig(LoraConfig):
    """
    Configuration for GLAD: LoRA trained with a gradient that leans towards the sharpness-aware (SAM) gradient
    ([paper](https://huggingface.co/papers/2507.13089); what is computed: docs/glad.md).

    The adapter math is exactly peft's LoRA. GLAD's knobs are training settings and belong to the trainer
    ([`GLADTrainingArguments`]: `glad_rho`, `glad_lambda`, `glad_share_dropout_masks`); setting them here is
    deprecated (a `FutureWarning`, removed in regtune 0.2). Until then a value set here is recorded in
    `adapter_config.json` and used where the trainer arguments leave it unset. Every field is validated at construction: one `ValueError` names each invalid field and its allowed values.

    Args:
        rho (`float`, defaults to `0.05`):
            Radius of the SAM perturbation `eps = rho * g / ||g||`. A finite number > 0.
        glad_lambda (`float`, defaults to `0.5`):
            Weight of the SAM reference: `g_final = g + glad_lambda * (g_sam - g)`. 0 is plain LoRA, 1 is SAM. A
            finite number in [0, 1].
        share_dropout_masks (`bool`, defaults to `True`):
            Whether the perturbed pass reuses the first pass's dropout masks (see [`GLADSettings`]).
    """

    rho: float = settings_field("rho")
    glad_lambda: float = settings_field("glad_lambda")
    share_dropout_masks: bool = settings_field("share_dropout_masks")

    def __post_init__(self):
        errors = lora_field_errors(self)
        errors += GLADSettings.field_errors({name: getattr(self, name) for name in SETTINGS_FIELDS})
        raise_field_errors("GLADConfig", errors)
        training_knob_in_adapter_config(
            "GLADConfig",
            {"rho": "GLADTrainingArguments(glad_rho=)", "glad_lambda": "GLADTrainingArguments(glad_lambda=)",
             "share_dropout_masks": "GLADTrainingArguments(glad_share_dropout_masks=)"},
            {name: getattr(self, name) for name in SETTINGS_FIELDS},
            {f.name: f.default for f in dataclasses.fields(GLADSettings)},
        )  # fmt: skip
        super().__post_init__()
        self.peft_type = PeftType.GLAD

    @property
    def glad_settings(self) -> GLADSettings:
        """The [`GLADSettings`] recorded by this config."""
        return GLADSettings(**{name: getattr(self, name) for name in SETTINGS_FIELDS})
