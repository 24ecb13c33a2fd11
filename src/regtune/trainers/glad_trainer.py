"""`GLADTrainer`: a `transformers.Trainer` that trains with GLAD's SAM-referenced gradient."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from regtune.regularizers.glad import GLADRegularizer

from .reg_trainer import RegTrainer


@dataclass
class GLADTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` plus GLAD's two knobs ([paper](https://huggingface.co/papers/2507.13089)).

    Args:
        glad_rho (`float`, *optional*):
            SAM radius (> 0). Defaults to the `rho` of the model's [`GLADConfig`], else 0.05.
        glad_lambda (`float`, *optional*):
            Weight of the SAM reference gradient in [0, 1] (0 = plain training, 1 = SAM). Defaults to the
            `glad_lambda` of the model's [`GLADConfig`], else 0.5.
    """

    glad_rho: float | None = field(
        default=None, metadata={"help": "SAM radius (> 0); default: the model's GLADConfig.rho, else 0.05."}
    )
    glad_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the SAM reference in [0, 1]; default: the model's GLADConfig.glad_lambda, else 0.5."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.glad_rho is not None and not self.glad_rho > 0:
            raise ValueError(f"GLADTrainingArguments: `glad_rho` must be > 0, got {self.glad_rho!r}.")
        if self.glad_lambda is not None and not 0.0 <= self.glad_lambda <= 1.0:
            raise ValueError(f"GLADTrainingArguments: `glad_lambda` must be in [0, 1], got {self.glad_lambda!r}.")


class GLADTrainer(RegTrainer):
    """
    A [`RegTrainer`] whose training step is GLAD's (see [`regtune.regularizers.GLADRegularizer`] for the exact
    semantics under gradient accumulation and DDP). Other, non-step-owning regularizers can be added with
    `regularizers=[...]`.

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.GLADConfig(r=8, rho=0.05, glad_lambda=0.5))
        >>> trainer = regtune.GLADTrainer(model=model, args=regtune.GLADTrainingArguments("out"), train_dataset=ds)
        >>> trainer.train()
        ```
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *pargs, regularizers=None, **kwargs):
        glad = GLADRegularizer.from_model(
            model, rho=getattr(args, "glad_rho", None), glad_lambda=getattr(args, "glad_lambda", None)
        )
        super().__init__(model, args, *pargs, regularizers=[glad, *(regularizers or [])], **kwargs)
