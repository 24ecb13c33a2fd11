"""`RegTrainer`: `transformers.Trainer` with composable regularizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from regtune.regularizers import Regularizer

from .mixin import RegularizedTrainerMixin
from .model_loading import prepare_model


class RegTrainer(RegularizedTrainerMixin, Trainer):
    """
    A `transformers.Trainer` that takes `regularizers=[...]` (see [`RegularizedTrainerMixin`] and [`Regularizer`]),
    and `on_nonfinite="error" | "skip" | "ignore"`: what to do when the task loss, a regularizer term or the gradient
    norm of a step is NaN or infinite (by default the run stops at that optimizer step with a
    [`NonFiniteLossError`] naming the step and the term).

    Like trl's trainers, `model` may be a model instance or a Hub id / local path (loaded with the class its config
    names, `from_pretrained(model, **model_init_kwargs)`), and `peft_config=` wraps it with
    `peft.get_peft_model`. The other arguments are `transformers.Trainer`'s.

    Args:
        model (`PreTrainedModel`, `nn.Module` or `str`, *optional*):
            The model, or the Hub id / local folder of one.
        args (`TrainingArguments`, *optional*):
            The training arguments (for a subclass: its `config_class`; default: `output_dir="trainer_output"`).
        peft_config (`peft.PeftConfig`, *optional*):
            An adapter config (`peft.LoraConfig`, `regtune.GLADConfig`, ...) applied to `model`.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments of `from_pretrained` when `model` is a string (e.g. `{"num_labels": 4}`).
        regularizers (`list[Regularizer]`, *optional*):
            The regularizers, applied in list order (a mapping `{"type": name, **kwargs}` is built by name).
        on_nonfinite (`str`, defaults to `"error"`):
            `"error"`, `"skip"` or `"ignore"` (see [`RegularizedTrainerMixin`]).

    Example:

    ```py
    >>> from regtune import RegTrainer
    >>> from regtune.regularizers import DropoutSchedule, MultiSampleDropout

    >>> trainer = RegTrainer(
    ...     model="google-bert/bert-base-uncased",
    ...     model_init_kwargs={"num_labels": 2},
    ...     peft_config=LoraConfig(r=8, task_type="SEQ_CLS"),
    ...     args=TrainingArguments(output_dir="out"),
    ...     train_dataset=train_ds,
    ...     eval_dataset=eval_ds,
    ...     regularizers=[MultiSampleDropout(num_samples=8), DropoutSchedule(p=0.1, mode="linear", end_fraction=0.5)],
    ... )
    >>> trainer.train()
    ```
    """

    config_class: type[TrainingArguments] = TrainingArguments

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., PreTrainedModel] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        peft_config: Any = None,
        model_init_kwargs: dict[str, Any] | None = None,
        regularizers: Iterable[Regularizer] | None = None,
        on_nonfinite: str = "error",
    ):
        model = prepare_model(model, peft_config, model_init_kwargs)
        if args is None:
            args = self.config_class(output_dir="trainer_output")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            regularizers=[*self._method_regularizers(model, args), *(regularizers or [])],
            on_nonfinite=on_nonfinite,
        )

    def _method_regularizers(self, model: Any, args: TrainingArguments) -> list[Regularizer]:
        """The regularizers a named trainer adds for its method, before the user's (none for `RegTrainer`)."""
        return []
