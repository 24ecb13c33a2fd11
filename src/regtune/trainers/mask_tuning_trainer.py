"""`MaskTuningTrainer`: R-AMT training (score penalty + gradient dropout) on a `transformers.Trainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from regtune.regularizers.mask_tuning import GradientDropout, MaskFlipMonitor, MaskScorePenalty
from regtune.tuners.mask_tuning.settings import DEFAULTS, HELP, check_fields, raise_if_errors

from .reg_trainer import RegTrainer


@dataclass
class MaskTuningTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` plus R-AMT's training knobs ([paper](https://huggingface.co/papers/2307.15049)), the config
    class of [`MaskTuningTrainer`] (its `config_class`; a recipe's `training.graddrop_lambda` sets it). Defaults,
    allowed values and error messages come from `regtune.tuners.mask_tuning.settings`, shared with
    [`MaskTuningConfig`] and the regularizers. Knobs left at `None` come from the model's [`MaskTuningConfig`]
    (which records how the adapter was trained).

    Args:
        score_l2_weight (`float`, *optional*): weight of `sum_l ||S_l||_2`, a finite number >= 0; default: the
            config's (1e-4).
        graddrop_lambda (`float`, *optional*): gradient-dropout strength in [0, 1], 0 = off; default: the config's
            (1.0, the released configs' value, used by its base-to-novel script; its README sets 0.3 for the
            16-shot few-shot runs on most data sets).
        graddrop_temperature (`float`, defaults to `1.0`): temperature of the knowledge loss, a finite number > 0.
        mask_flips_per_layer (`bool`, defaults to `False`): log the flipped share of every masked layer
            (`mask_tuning/flipped/<layer>`) besides the overall one.
    """

    score_l2_weight: float | None = field(
        default=None, metadata={"help": HELP["score_l2_weight"] + " Default: the MaskTuningConfig's."}
    )
    graddrop_lambda: float | None = field(
        default=None, metadata={"help": HELP["graddrop_lambda"] + " Default: the MaskTuningConfig's."}
    )
    graddrop_temperature: float = field(
        default=DEFAULTS["graddrop_temperature"], metadata={"help": HELP["graddrop_temperature"]}
    )
    mask_flips_per_layer: bool = field(
        default=False, metadata={"help": "Log the flipped share of every masked layer besides the overall one."}
    )

    def __post_init__(self):
        errors = check_fields(
            {
                "score_l2_weight": self.score_l2_weight,
                "graddrop_lambda": self.graddrop_lambda,
                "graddrop_temperature": self.graddrop_temperature,
            },
            optional=("score_l2_weight", "graddrop_lambda"),
        )
        if not isinstance(self.mask_flips_per_layer, bool):
            errors.append(f"`mask_flips_per_layer` must be True or False, got {self.mask_flips_per_layer!r}")
        raise_if_errors(type(self).__name__, errors)
        super().__post_init__()


class MaskTuningTrainer(RegTrainer):
    """
    A [`RegTrainer`] for mask-tuning models: adds [`MaskScorePenalty`], [`GradientDropout`] (it owns the step) unless
    `graddrop_lambda` is 0, and [`MaskFlipMonitor`] (the `mask_tuning/flipped` metrics). Checkpoints keep the
    real-valued scores (so a resumed run continues exactly); `save_model()` publishes bit-packed masks.

    The scores get no weight decay (as in the released code: the score penalty is their regularizer); other trainable
    parameters (a classifier head) follow `weight_decay`. Its config class is [`MaskTuningTrainingArguments`] (`MaskTuningTrainer.config_class`); plain
    `TrainingArguments` work too (the knobs then come from the model's [`MaskTuningConfig`]).

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.MaskTuningConfig(task_type="SEQ_CLS"))
        >>> args = regtune.MaskTuningTrainingArguments("out", learning_rate=8e-5, graddrop_lambda=0.3)
        >>> regtune.MaskTuningTrainer(model=model, args=args, train_dataset=ds).train()
        ```
    """

    config_class = MaskTuningTrainingArguments

    def _method_regularizers(self, model, args) -> list:
        config = next(iter(getattr(model, "peft_config", {}).values()), None)
        weight = getattr(args, "score_l2_weight", None)
        lam = getattr(args, "graddrop_lambda", None)
        weight = weight if weight is not None else getattr(config, "score_l2_weight", DEFAULTS["score_l2_weight"])
        lam = lam if lam is not None else getattr(config, "graddrop_lambda", DEFAULTS["graddrop_lambda"])
        temperature = getattr(args, "graddrop_temperature", DEFAULTS["graddrop_temperature"])
        own = [MaskScorePenalty(score_l2_weight=weight)]
        if lam > 0:
            own.append(GradientDropout(lam, graddrop_temperature=temperature))
        own.append(MaskFlipMonitor(per_layer=getattr(args, "mask_flips_per_layer", False)))
        return own

    def get_decay_parameter_names(self, model) -> list[str]:
        # R-AMT trains the scores without weight decay (the released code): the score penalty is their regularizer
        return [name for name in super().get_decay_parameter_names(model) if "masktune_scores" not in name]
