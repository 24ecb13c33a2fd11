"""`RegTrainer`: `transformers.Trainer` with composable regularizers."""

from __future__ import annotations

from transformers import Trainer

from .mixin import RegularizedTrainerMixin


class RegTrainer(RegularizedTrainerMixin, Trainer):
    """
    A `transformers.Trainer` that takes `regularizers=[...]` (see [`RegularizedTrainerMixin`] and [`Regularizer`]),
    and `on_nonfinite="error" | "skip" | "ignore"`: what to do when the task loss, a regularizer term or the gradient
    norm of a step is NaN or infinite (by default the run stops at that optimizer step with a
    [`NonFiniteLossError`] naming the step and the term).

    Example:

    ```py
    >>> from regtune import RegTrainer
    >>> from regtune.regularizers import DropoutSchedule, MultiSampleDropout

    >>> trainer = RegTrainer(
    ...     model=model,
    ...     args=TrainingArguments(output_dir="out"),
    ...     train_dataset=train_ds,
    ...     eval_dataset=eval_ds,
    ...     regularizers=[MultiSampleDropout(num_samples=8), DropoutSchedule(p=0.1, mode="linear", end_fraction=0.5)],
    ... )
    >>> trainer.train()
    ```
    """
