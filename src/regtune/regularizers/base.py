"""The `Regularizer` protocol: a small object with optional hooks that [`RegularizedTrainerMixin`] calls."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback


class Regularizer:
    """
    Base class of regtune's composable regularizers. Every hook is optional; the defaults do nothing.

    A trainer built with [`RegularizedTrainerMixin`] (e.g. [`RegTrainer`]) takes `regularizers=[...]` and calls, for
    each of them:

    1. `callbacks()` once, when the trainer is constructed: the returned `TrainerCallback`s are added to the trainer
       (schedules live there; they see `state.global_step`, `state.max_steps` and the model).
    2. `setup(trainer)` at the start of every `train()` call (from `on_train_begin`, before the regularizers' own
       callbacks), then `load_state_dict(state)` when the run resumes from a checkpoint that holds a state for it.
    3. For every training micro-batch (never during evaluation or prediction):

       - `forward_context(trainer, model, inputs)` is entered around the host trainer's own `compute_loss`, and left
         right after it. This is how a regularizer changes the forward: it registers hooks on the model (forward
         hooks on a head, a `loss_function` wrapper, ...) on entry and removes them on exit, so the eval forward and
         `save_pretrained` never see them. Any number of regularizers may do this; they nest in list order.
       - `loss_term(model, inputs, outputs)`, after the host's `compute_loss`: a scalar added to the task loss. The
         mixin scales it exactly like the task loss under gradient accumulation (see [`RegularizedTrainerMixin`]), so
         return a plain per-micro-batch value (a mean over the micro-batch, or a function of the weights).
       - if `owns_step`, `training_step(trainer, model, inputs, num_items_in_batch)` replaces the Trainer's
         forward/backward for the micro-batch (multi-pass methods: LfU, GLAD, gradient dropout). At most one
         regularizer may own the step.

    4. `diagnostics()` whenever the Trainer logs training metrics (every `logging_steps`): a dict of numbers that
       show whether the regularizer's mechanism is active (e.g. the fraction of masks flipped, the cosine between the
       plain and the SAM gradient). The mixin adds them to the Trainer's logs as `"<name>/<key>"`, so they reach
       every `report_to` integration (tensorboard, wandb, trackio). Accumulate detached tensors during the steps (no
       `.item()` inside a step) and return their mean since the last call; return `{}` when
       `log_diagnostics` is `False`.
    5. `state_dict()` whenever the trainer writes a checkpoint: it is saved inside `checkpoint-N/` (file
       `regtune_regularizers.pt`, one per process under DDP) and given back to `load_state_dict` on resume, so a
       resumed run continues exactly. Return tensors and Python primitives only (the file is read with
       `torch.load(weights_only=True)`).

    Class attributes:
        name (`str`): the key of the regularizer in the checkpoint and in error messages; the registry name for the
            built-in ones. Two regularizers of one trainer must have different names (set `self.name` in `__init__`
            to use one class twice).
        owns_step (`bool`, defaults to `False`): whether [`Regularizer.training_step`] replaces the Trainer's.
        log_diagnostics (`bool`, defaults to `True`): whether [`Regularizer.diagnostics`] computes and reports the
            mechanism's diagnostics (set it to `False` to skip their cost).
        input_columns (`tuple[str, ...]`, defaults to `()`): data set columns the regularizer reads from the batch
            that are not model inputs (e.g. ELR's `sample_index`): the mixin keeps them through the Trainer's
            `remove_unused_columns`, gives them to the hooks in `inputs`, and never passes them to the model.

    Example (a loss term):

    ```py
    >>> class LogitPenalty(Regularizer):
    ...     name = "logit_penalty"
    ...
    ...     def __init__(self, weight=1e-3):
    ...         self.weight = weight
    ...
    ...     def loss_term(self, model, inputs, outputs):
    ...         return self.weight * outputs.logits.float().pow(2).mean()

    >>> trainer = RegTrainer(model=model, args=args, train_dataset=ds, regularizers=[LogitPenalty()])
    ```
    """

    name: str = "regularizer"
    owns_step: bool = False
    log_diagnostics: bool = True
    input_columns: tuple[str, ...] = ()

    def setup(self, trainer: Trainer) -> None:
        """Called at the start of every `train()` call, after the model is wrapped and the optimizer is created."""

    def forward_context(
        self, trainer: Trainer | None, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> contextlib.AbstractContextManager:
        """
        Return a context manager entered around the host trainer's `compute_loss` for one training micro-batch.

        Use it to modify the forward for training only: register hooks on entry, remove them on exit. `model` is the
        model as the Trainer calls it (possibly wrapped by DDP; unwrap with `trainer.accelerator.unwrap_model`).
        """
        return contextlib.nullcontext()

    def loss_term(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """
        Return a scalar added to the training loss of this micro-batch, or `None` for nothing.

        Args:
            model (`torch.nn.Module`): the model as the Trainer called it (possibly wrapped by DDP).
            inputs (`dict`): the micro-batch, on device, with its `labels` (even when the Trainer popped them).
            outputs: what the model's first forward of this micro-batch returned (e.g. a `ModelOutput` with
                `logits`; trl's SFTTrainer uses a fused LM head whose output has `log_probs` but no `logits`), or
                `None` when the host computed its loss without calling the model.
        """
        return None

    def training_step(
        self,
        trainer: Trainer,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """
        Do the forward and backward passes of one training micro-batch (only called when `owns_step` is `True`).

        The mixin has already put the model in train mode and moved `inputs` to the device. The usual body:

        ```py
        >>> with trainer.compute_loss_context_manager():
        ...     loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        >>> return trainer.scaled_backward(loss, num_items_in_batch)
        ```

        `trainer.compute_loss` applies the other regularizers (their forward contexts and loss terms), and
        `trainer.scaled_backward` applies the Trainer's gradient-accumulation rule and calls `accelerator.backward`.

        Returns:
            `torch.Tensor`: the detached loss, scaled like `Trainer.training_step`'s return value (for logging).
        """
        # `check_regularizers` already refuses such a regularizer when the trainer is built; this guards direct calls
        raise TypeError(f"{type(self).__name__} sets `owns_step = True` but does not define `training_step`.")

    def callbacks(self) -> list[TrainerCallback]:
        """Return the `TrainerCallback`s to add to the trainer (called once, at trainer construction)."""
        return []

    def diagnostics(self) -> dict[str, float | torch.Tensor]:
        """
        Return the mechanism's diagnostics accumulated since the last call (numbers or 0-dim tensors), then reset them.

        Called by the mixin when the Trainer logs training metrics; keys are prefixed with `"<name>/"` in the logs.
        """
        return {}

    def state_dict(self) -> dict:
        """Return the state needed to resume exactly (tensors and Python primitives)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state returned by [`Regularizer.state_dict`] (called after `setup` when resuming)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def overrides(regularizer: Regularizer, hook: str) -> bool:
    """Whether `regularizer`'s class defines its own `hook` instead of inheriting the no-op of [`Regularizer`]."""
    return getattr(type(regularizer), hook) is not getattr(Regularizer, hook)
