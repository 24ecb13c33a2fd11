"""`GLADTrainer`: a `transformers.Trainer` that trains with GLAD's SAM-referenced gradient."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from regtune.regularizers.glad import GLADRegularizer
from regtune.tuners.glad.settings import (
    SETTINGS_FIELDS,
    GLADSettings,
    bool_error,
    raise_field_errors,
    settings_field,
)

from .reg_trainer import RegTrainer


@dataclass
class GLADTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` plus GLAD's [`GLADSettings`], as `glad_<field>` ([paper](https://huggingface.co/papers/2507.13089);
    what GLAD computes: docs/glad.md). A field left at `None` takes its value from the model's [`GLADConfig`], else
    from [`GLADSettings`]'s default. Every GLAD field is validated at construction, together: one `ValueError` names
    each invalid field and its allowed values.

    Args:
        glad_rho (`float`, *optional*):
            SAM radius, a finite number > 0. Defaults to the `rho` of the model's [`GLADConfig`], else 0.05.
        glad_lambda (`float`, *optional*):
            Weight of the SAM reference gradient in [0, 1] (0 = plain training, 1 = SAM). Defaults to the
            `glad_lambda` of the model's [`GLADConfig`], else 0.5.
        glad_share_dropout_masks (`bool`, *optional*):
            Whether the perturbed pass reuses the first pass's dropout masks. Defaults to the model's
            [`GLADConfig`], else `True`.
        glad_log_diagnostics (`bool`, defaults to `True`):
            Whether to log `glad/cos_g_gsam` and `glad/rel_diff` with the training loss.
    """

    glad_rho: float | None = settings_field("rho", optional=True)
    glad_lambda: float | None = settings_field("glad_lambda", optional=True)
    glad_share_dropout_masks: bool | None = settings_field("share_dropout_masks", optional=True)
    glad_log_diagnostics: bool = field(
        default=True,
        metadata={"help": "Whether to log cos(g, g_sam) and ||g_sam - g|| / ||g|| with the training loss."},
    )

    def __post_init__(self):
        overrides = self._glad_overrides()
        names = {name: self._glad_arg_name(name) for name in SETTINGS_FIELDS}
        errors = GLADSettings.field_errors(overrides, names) + [
            bool_error("glad_log_diagnostics", self.glad_log_diagnostics)
        ]
        raise_field_errors("GLADTrainingArguments", errors)
        super().__post_init__()

    @staticmethod
    def _glad_arg_name(name: str) -> str:
        return name if name.startswith("glad_") else f"glad_{name}"

    def _glad_overrides(self) -> dict:
        values = {name: getattr(self, self._glad_arg_name(name)) for name in SETTINGS_FIELDS}
        return {name: value for name, value in values.items() if value is not None}

    def glad_settings(self, base: GLADSettings | None = None) -> GLADSettings:
        """`base` (e.g. the model's recorded settings; default: [`GLADSettings`]'s defaults) with this config's
        non-`None` GLAD fields applied."""
        return (base or GLADSettings()).replace(**self._glad_overrides())


class GLADTrainer(RegTrainer):
    """
    A [`RegTrainer`] whose training step is GLAD's (see [`regtune.regularizers.GLADRegularizer`] for the exact
    semantics under dropout, gradient accumulation and DDP). Its config class is [`GLADTrainingArguments`] (so a
    recipe's `training.glad_lambda` works). The settings are the model's [`GLADConfig`] ones (when it has one),
    overridden by the non-`None` `glad_*` fields of `args`. Other, non-step-owning regularizers can be added with
    `regularizers=[...]`.

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.GLADConfig(r=8))
        >>> trainer = regtune.GLADTrainer(model=model, args=regtune.GLADTrainingArguments("out"), train_dataset=ds)
        >>> trainer.train()
        ```
    """

    config_class = GLADTrainingArguments

    def _method_regularizers(self, model, args) -> list:
        settings = GLADSettings.from_model(model)
        log_diagnostics = True
        if isinstance(args, GLADTrainingArguments):
            settings = args.glad_settings(settings)
            log_diagnostics = args.glad_log_diagnostics
        return [GLADRegularizer(settings=settings, log_diagnostics=log_diagnostics)]
