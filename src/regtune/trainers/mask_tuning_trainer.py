"""`MaskTuningTrainer`: R-AMT training (score penalty + gradient dropout) on a `transformers.Trainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from regtune.regularizers.mask_tuning import GradientDropout, MaskScorePenalty

from .reg_trainer import RegTrainer


@dataclass
class MaskTuningTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` plus R-AMT's knobs ([paper](https://huggingface.co/papers/2307.15049)). Unset knobs come
    from the model's [`MaskTuningConfig`].

    Args:
        score_l2_weight (`float`, *optional*): weight of `sum_l ||S_l||_2` (>= 0); default: the config's (1e-4).
        graddrop_lambda (`float`, *optional*): gradient-dropout strength in [0, 1], 0 = off; default: the
            config's (1.0).
    """

    score_l2_weight: float | None = field(
        default=None, metadata={"help": "Weight of the score penalty (>= 0); default: MaskTuningConfig's."}
    )
    graddrop_lambda: float | None = field(
        default=None, metadata={"help": "Gradient dropout in [0, 1], 0 = off; default: MaskTuningConfig's."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.score_l2_weight is not None and self.score_l2_weight < 0:
            raise ValueError(
                f"MaskTuningTrainingArguments: `score_l2_weight` must be >= 0, got {self.score_l2_weight}."
            )
        if self.graddrop_lambda is not None and not 0.0 <= self.graddrop_lambda <= 1.0:
            raise ValueError(
                f"MaskTuningTrainingArguments: `graddrop_lambda` must be in [0, 1], got {self.graddrop_lambda}."
            )


class MaskTuningTrainer(RegTrainer):
    """
    A [`RegTrainer`] for mask-tuning models: adds [`MaskScorePenalty`] and, unless `graddrop_lambda` is 0,
    [`GradientDropout`] (it owns the step). Checkpoints keep the real-valued scores (so a resumed run continues
    exactly); `save_model()` publishes bit-packed masks.

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.MaskTuningConfig(task_type="SEQ_CLS"))
        >>> args = regtune.MaskTuningTrainingArguments("out", learning_rate=8e-5, graddrop_lambda=0.3)
        >>> regtune.MaskTuningTrainer(model=model, args=args, train_dataset=ds).train()
        ```
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *pargs, regularizers=None, **kwargs):
        config = next(iter(getattr(model, "peft_config", {}).values()), None)
        weight = getattr(args, "score_l2_weight", None)
        lam = getattr(args, "graddrop_lambda", None)
        weight = weight if weight is not None else getattr(config, "score_l2_weight", 1e-4)
        lam = lam if lam is not None else getattr(config, "graddrop_lambda", 1.0)
        own = [MaskScorePenalty(weight)] + ([GradientDropout(lam)] if lam > 0 else [])
        super().__init__(model, args, *pargs, regularizers=[*own, *(regularizers or [])], **kwargs)
