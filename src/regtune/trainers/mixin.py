"""`RegularizedTrainerMixin`: a `regularizers=[...]` argument for any `transformers.Trainer` subclass."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from regtune._sharding import check_distributed_support
from regtune.regularizers import Regularizer, build_regularizer
from regtune.regularizers.base import overrides
from regtune.tuners import training_hooks

from .model_loading import host_takes_peft_config, prepare_model


logger = logging.getLogger(__name__)

REGULARIZERS_STATE_NAME = "regtune_regularizers.pt"
"""File, inside `checkpoint-N/`, holding the regularizers' `state_dict`s (one file per process under DDP:
`regtune_regularizers_{process_index}.pt`, like the Trainer's `rng_state_{process_index}.pth`)."""

_STATE_FORMAT = 1

NONFINITE_ACTIONS = ("error", "skip", "ignore")
"""What the non-finite guard of [`RegularizedTrainerMixin`] does (its `on_nonfinite` argument)."""


class NonFiniteLossError(FloatingPointError):
    """
    A training step produced a non-finite (NaN or infinite) task loss, regularizer term, training loss or gradient
    norm: raised by [`RegularizedTrainerMixin`] with `on_nonfinite="error"` (the default) before the optimizer step,
    so the weights are those of the previous step. The message names the optimizer step, the micro-batch and the
    term.
    """


class RegularizerStateError(ValueError):
    """
    A checkpoint's regularizer state (`regtune_regularizers.pt`) is damaged or does not fit this run: the message
    names the file, the regularizer and what is wrong.
    """


def regularizer_state_file(world_size: int, process_index: int) -> str:
    """The name of the regularizer-state file written by process `process_index` of `world_size`."""
    if world_size <= 1:
        return REGULARIZERS_STATE_NAME
    stem, ext = os.path.splitext(REGULARIZERS_STATE_NAME)
    return f"{stem}_{process_index}{ext}"


def check_regularizers(regularizers: Regularizer | Iterable[Regularizer | Mapping] | None) -> list[Regularizer]:
    """
    Validate a list of regularizers (instances, or `{"type": name, **kwargs}` mappings for [`build_regularizer`]).

    Raises:
        `TypeError`: for an item that is not a [`Regularizer`].
        `ValueError`: when two regularizers share a `name`, when more than one owns the training step (the message
            names them), or when a step owner does not define `training_step`.
    """
    if regularizers is None:
        return []
    if isinstance(regularizers, (Regularizer, Mapping)):
        regularizers = [regularizers]
    result = []
    for item in regularizers:
        if isinstance(item, Mapping):
            if "type" not in item:
                raise ValueError(
                    f"A regularizer mapping needs a 'type' key (one of the registry names), got {dict(item)}."
                )
            item = build_regularizer(**item)
        if not isinstance(item, Regularizer):
            raise TypeError(
                f"`regularizers` must hold regtune.Regularizer instances (or {{'type': ..., **kwargs}} mappings), "
                f"got {type(item).__name__}."
            )
        result.append(item)
    names = [reg.name for reg in result]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"Two regularizers share the name(s) {duplicates}; the name keys their state in checkpoints. Set a "
            "distinct `name` on each instance."
        )
    owners = [reg for reg in result if reg.owns_step]
    if len(owners) > 1:
        listed = " and ".join(f"{reg.name!r} ({type(reg).__name__})" for reg in owners)
        raise ValueError(
            f"At most one regularizer may own the training step (`owns_step=True`), got {len(owners)}: {listed}. Each "
            "does its own forward/backward, so they cannot be combined; keep one of them."
        )
    for reg in owners:
        if not overrides(reg, "training_step"):
            raise ValueError(f"Regularizer {reg.name!r} sets `owns_step = True` but does not define `training_step`.")
    return result


def _state_problems(loaded: Any, current: Any, key: str = "") -> list[str]:
    """
    What is wrong with a regularizer's `loaded` state against its `current` one (after `setup`): tensors of another
    shape, NaN or infinite values where the current state is finite, a tensor where the current state holds none.
    Keys of only one side are left to the regularizer's `load_state_dict`.
    """
    label = f"`{key}`" if key else "the state"
    if isinstance(loaded, dict):
        if not isinstance(current, dict):
            return []
        return [
            problem
            for name, value in loaded.items()
            if name in current
            for problem in _state_problems(value, current[name], f"{key}.{name}" if key else str(name))
        ]
    if isinstance(loaded, (list, tuple)):
        if not isinstance(current, (list, tuple)) or len(current) != len(loaded):
            return []
        return [
            problem
            for index, (value, reference) in enumerate(zip(loaded, current))
            for problem in _state_problems(value, reference, f"{key}[{index}]")
        ]
    problems = []
    if isinstance(current, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            return [f"{label} is a {type(loaded).__name__}, this run has a tensor of shape {tuple(current.shape)}"]
        if loaded.shape != current.shape:
            return [f"{label} has shape {tuple(loaded.shape)}, this run expects {tuple(current.shape)}"]
    # non-finite values are refused, except where the regularizer's own fresh state has them too (a sentinel)
    if isinstance(loaded, torch.Tensor) and (loaded.is_floating_point() or loaded.is_complex()):
        bad = ~torch.isfinite(loaded)
        sentinel = (
            isinstance(current, torch.Tensor)
            and current.shape == loaded.shape
            and (current.is_floating_point() or current.is_complex())
            and bad.equal(~torch.isfinite(current))
        )
        if bad.any() and not sentinel:
            problems.append(f"{label} holds {int(bad.sum())} NaN/infinite value(s) of {loaded.numel()}")
    elif isinstance(loaded, float) and not math.isfinite(loaded):
        if not (isinstance(current, float) and not math.isfinite(current)):
            problems.append(f"{label} is {loaded}")
    return problems


class _MixinCallback(TrainerCallback):
    """
    The mixin's own hooks, registered before the regularizers' callbacks: at `on_train_begin` it calls the
    regularizers' `setup` (and loads resumed state) and resets the non-finite guard; before every optimizer step it
    checks what the guard recorded during the step's micro-batches.
    """

    def __init__(self, trainer: RegularizedTrainerMixin, setup: bool, guard: bool):
        self._trainer = weakref.ref(trainer)
        self._setup, self._guard = setup, guard

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and self._guard:
            trainer._regtune_guard_reset()
        if trainer is not None and self._setup:
            trainer._regtune_setup()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and self._guard:
            trainer._regtune_check_finite(state)


def _prepare_model_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """trl's `model` (instance or id) and `peft_config=` conventions for a host trainer that lacks them."""
    peft_config, model_init_kwargs = kwargs.pop("peft_config", None), kwargs.pop("model_init_kwargs", None)
    model = args[0] if args else kwargs.get("model")
    if isinstance(model, str) or peft_config is not None or model_init_kwargs:
        model = prepare_model(model, peft_config, model_init_kwargs)
        if args:
            args = (model, *args[1:])
        else:
            kwargs["model"] = model
    return args, kwargs


class RegularizedTrainerMixin:
    """
    Gives any `transformers.Trainer` subclass a `regularizers=[...]` argument (see [`Regularizer`] for the hooks).

    ```py
    >>> from trl import SFTTrainer
    >>> class RegSFTTrainer(RegularizedTrainerMixin, SFTTrainer): ...  # the mixin goes first (else a TypeError)
    >>> trainer = RegSFTTrainer(model=model, args=args, train_dataset=ds,
    ...                         regularizers=[DropoutSchedule(p=0.1, mode="step", start_fraction=0.5)])
    ```

    What it guarantees:

    - **Training only.** Forward contexts and loss terms are applied only inside `training_step`; `evaluate`,
      `predict` and the eval inside `train` call the host's `compute_loss` untouched.
    - **Gradient accumulation.** A loss term is added to the loss of every micro-batch once. When the host's
      `training_step` will divide the loss by the number of accumulation steps (the loss is a per-batch mean) the
      term is added as is; when the host treats the loss as already scaled for accumulation -- the same rule as
      `Trainer.training_step`: `loss_is_scaled_for_ga`, else `model_accepts_loss_kwargs` and `num_items_in_batch`
      given, or a `compute_loss_func` -- the term is divided by `current_gradient_accumulation_steps`. Either way an
      optimizer step gets the mean of the term over its micro-batches, whatever the accumulation setting. The term
      is never multiplied by the number of processes (`average_tokens_across_devices` rescales only the token-summed
      task loss): DDP averages gradients, so a per-process mean becomes the global mean.
    - **Step ownership.** At most one regularizer may own the step (a `ValueError` at construction names both);
      its `training_step` replaces the host's for each micro-batch, inside the Trainer's DDP `no_sync` handling.
      Helpers for it: `compute_loss` (applies the other regularizers) and [`scaled_backward`].
    - **Mixed precision.** Loss terms run inside `compute_loss_context_manager()` like the task loss; forwards
      through the model use Accelerate's autocast.
    - **Checkpoints.** The regularizers' `state_dict()` is written into `checkpoint-N/regtune_regularizers.pt`
      (`regtune_regularizers_{rank}.pt` per process under DDP), atomically (a temp file then `os.replace`), next
      to the optimizer state and before `trainer_state.json`, so every complete checkpoint holds it. On
      `train(resume_from_checkpoint=...)` it is read with the optimizer state (`torch.load(weights_only=True)`
      only) and given to `load_state_dict` right after `setup`. A damaged file (empty, not a torch file, objects
      other than tensors and primitives, a tensor whose shape differs from the regularizer's, NaN or infinite values
      where the regularizer holds finite ones) raises a [`RegularizerStateError`] naming the file, the regularizer
      and the problem.
    - **Non-finite guard.** During each micro-batch the mixin keeps (on the device, without reading them) the task
      loss, every regularizer's loss term and the loss the step returns; once per optimizer step, right before it
      (`on_pre_optimizer_step`, after the Trainer computed the gradient norm), it reads them together with the
      gradient norm in one host transfer (one all-reduced flag under DDP, so every process takes the same
      decision). A NaN or infinite value then raises a [`NonFiniteLossError`] naming the optimizer step, the
      micro-batch and the term (`on_nonfinite="error"`, the default), or skips the update (`"skip"`: all gradients
      are dropped, so the optimizer leaves every weight and its own state as they were; the learning-rate schedule
      and `global_step` advance; the count is logged as `regtune/nonfinite_skipped_steps`), or does nothing (`"ignore"`:
      the Trainer's own behaviour, where `logging_nan_inf_filter` hides the NaN loss from the logs while the weights
      become NaN). Under fp16 mixed precision the gradient norm is not checked: the gradient scaler skips
      overflowing steps itself. `"skip"` is refused under DeepSpeed, whose engine steps inside the backward.

    Args:
        regularizers (`list[Regularizer]`, *optional*): the regularizers, applied in list order. A mapping
            `{"type": name, **kwargs}` is built with [`build_regularizer`].
        on_nonfinite (`str`, defaults to `"error"`): what the non-finite guard does with a NaN or infinite task
            loss, loss term, training loss or gradient norm: `"error"` (stop with a [`NonFiniteLossError`]),
            `"skip"` (skip the optimizer step, log the count) or `"ignore"` (no guard).
        *args, **kwargs: passed to the host trainer. For a host that does not take them itself (trl's trainers
            do), a `model` given as a Hub id or local path is loaded (`model_init_kwargs=` go to
            `from_pretrained`) and `peft_config=` is applied with `peft.get_peft_model`.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from transformers import Trainer

        mro = cls.__mro__
        before = mro[: mro.index(RegularizedTrainerMixin)]
        hosts = [
            base for base in before if issubclass(base, Trainer) and not issubclass(base, RegularizedTrainerMixin)
        ]
        if hosts:
            raise TypeError(
                f"{cls.__name__}: RegularizedTrainerMixin must come before {hosts[0].__name__} in the bases, so that "
                f"it receives `regularizers=` first: class {cls.__name__}(RegularizedTrainerMixin, "
                f"{hosts[0].__name__}): ..."
            )

    def __init__(
        self, *args, regularizers: Iterable[Regularizer] | None = None, on_nonfinite: str = "error", **kwargs
    ):
        if not isinstance(on_nonfinite, str) or on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(
                f"`on_nonfinite` must be one of {list(NONFINITE_ACTIONS)}, got {on_nonfinite!r}: 'error' stops at a "
                "NaN/infinite loss, term or gradient norm, 'skip' skips that optimizer step, 'ignore' turns the guard "
                "off."
            )
        self.on_nonfinite = on_nonfinite
        self.nonfinite_skipped_steps = 0
        self._regtune_guard_reset()
        regs = check_regularizers(regularizers)
        self.regularizers: list[Regularizer] = regs
        self._regtune_owner = next((reg for reg in regs if reg.owns_step), None)
        self._regtune_term_regs = [reg for reg in regs if overrides(reg, "loss_term")]
        self._regtune_input_columns = tuple(dict.fromkeys(c for reg in regs for c in reg.input_columns))
        self._regtune_in_training_step = False
        self._regtune_pending_state: dict | None = None
        self._regtune_term_sums: dict[str, tuple[torch.Tensor | float, int]] = {}
        if not host_takes_peft_config(super().__init__):  # trl's trainers load ids and apply peft_config themselves
            args, kwargs = _prepare_model_arguments(args, kwargs)
        super().__init__(*args, **kwargs)
        regs.extend(training_hooks.automatic_regularizers(self.model, regs))  # e.g. ALLoRA's c/eta diagnostics
        if regs or on_nonfinite != "ignore":
            self.add_callback(_MixinCallback(self, setup=bool(regs), guard=on_nonfinite != "ignore"))
        if regs:
            for reg in regs:
                for callback in reg.callbacks():
                    self.add_callback(callback)

    # ---- training ----

    def _regtune_setup(self) -> None:
        if self.on_nonfinite == "skip" and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "`on_nonfinite='skip'` cannot skip a DeepSpeed optimizer step (the engine steps inside the backward); "
                "use on_nonfinite='error' or 'ignore'."
            )
        check_distributed_support(self)  # DeepSpeed: refuse what cannot run under its ZeRO stage
        for reg in self.regularizers:
            reg.setup(self)
        pending, self._regtune_pending_state = self._regtune_pending_state, None
        if pending is not None:
            self._regtune_apply_state(pending)

    def loss_is_scaled_for_ga_now(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether the host's `training_step` takes the loss as already scaled for gradient accumulation."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _regtune_ga_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        self._regtune_in_training_step = True
        self._regtune_micro_batch += 1
        try:
            if self._regtune_owner is None:
                loss = super().training_step(model, inputs, num_items_in_batch)
                self._regtune_watch("training loss", loss)
                return loss
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            loss = self._regtune_owner.training_step(self, model, inputs, num_items_in_batch)
            self._regtune_watch(f"training loss (returned by {self._regtune_owner.name!r})", loss)
            return loss
        finally:
            self._regtune_in_training_step = False

    def scaled_backward(
        self, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """
        Backward `loss` the way `Trainer.training_step` does, for step-owning regularizers; return it detached.

        Applies the DataParallel mean, the division by the number of accumulation steps when the loss is not already
        scaled for it (see [`RegularizedTrainerMixin`]), and `accelerator.backward` (with DeepSpeed's
        `scale_wrt_gas=False` and LOMO's learning rate, as the Trainer does). Call it once per backward pass; a
        regularizer doing two passes that should each count fully calls it twice.
        """
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not self.loss_is_scaled_for_ga_now(num_items_in_batch):
            loss = loss / self._regtune_ga_steps()
        kwargs = {}
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            kwargs["learning_rate"] = self._get_learning_rate()
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)
        return loss.detach()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if not self._regtune_in_training_step:
            return super().compute_loss(
                model,
                self._regtune_model_inputs(inputs) if self._regtune_input_columns else inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        if not self.regularizers:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            self._regtune_watch("task loss", result[0] if return_outputs else result)
            return result
        captured: list[Any] = []
        with contextlib.ExitStack() as stack:
            for reg in self.regularizers:
                stack.enter_context(reg.forward_context(self, model, inputs))
            if self._regtune_term_regs and not return_outputs:
                # outputs of the host's first forward, without asking the host for them (trl's SFTTrainer warns and
                # runs an extra forward when `return_outputs=True`)
                handle = model.register_forward_hook(lambda module, args, output: captured.append(output))
                stack.callback(handle.remove)
            # a copy: hosts pop `labels` from the dict they get, and loss terms still want them; the regularizers'
            # own columns (e.g. `sample_index`) are not model inputs
            host_inputs = self._regtune_model_inputs(inputs)
            result = super().compute_loss(
                model, host_inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if return_outputs:
            loss, outputs = result
        else:
            loss, outputs = result, (captured[0] if captured else None)
        self._regtune_watch("task loss", loss)
        if self._regtune_term_regs:
            scaled = self.loss_is_scaled_for_ga_now(num_items_in_batch)
            self._regtune_log_term("regtune/task_loss", loss, scaled_for_ga=scaled)
            scale = 1.0 / self._regtune_ga_steps() if scaled else 1.0
            for reg in self._regtune_term_regs:
                term = reg.loss_term(model, inputs, outputs)
                if term is None:
                    continue
                if not isinstance(term, torch.Tensor) or term.dim() != 0:
                    raise ValueError(
                        f"Regularizer {reg.name!r}: `loss_term` must return a scalar tensor or None, got "
                        f"{type(term).__name__}{tuple(term.shape) if isinstance(term, torch.Tensor) else ''}."
                    )
                self._regtune_watch(f"loss term of regularizer {reg.name!r}", term)
                self._regtune_log_term(f"{reg.name}/loss", term)
                loss = loss + (term * scale if scale != 1.0 else term)
        return (loss, outputs) if return_outputs else loss

    # ---- the regularizers' own data columns (`Regularizer.input_columns`) ----

    def _set_signature_columns_if_needed(self) -> None:
        # `remove_unused_columns` keeps the model's forward arguments and the label names; the regularizers' own
        # columns (ELR's and PS-KD's `sample_index`) are kept too, and `_regtune_model_inputs` removes them before
        # the model is called
        unset = self._signature_columns is None
        super()._set_signature_columns_if_needed()
        if unset and self._regtune_input_columns:
            self._signature_columns += [c for c in self._regtune_input_columns if c not in self._signature_columns]

    def _regtune_model_inputs(self, inputs):
        """`inputs` (a copy) without the regularizers' own columns, which are not model inputs."""
        if not isinstance(inputs, Mapping):
            return inputs
        columns = self._regtune_input_columns
        return {k: v for k, v in inputs.items() if k not in columns} if columns else dict(inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._regtune_input_columns and isinstance(inputs, Mapping):
            inputs = self._regtune_model_inputs(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def create_optimizer(self, *args, **kwargs):
        # ALLoRA adapters with coefficient_on="update" get their update-side coefficient on the optimizer built here
        # (a user-given optimizer is left alone: ALLoRA's guard refuses it at its first step if it would train them)
        built_here = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if built_here:
            training_hooks.prepare_optimizer(optimizer, self.model)
        return optimizer

    # ---- logging ----

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # training logs (they carry the loss) get the regularizers' mechanism diagnostics, through the Trainer's own
        # logging, so they reach every `report_to` integration
        if self.regularizers and "loss" in logs:
            logs = {**logs, **self._regtune_logged_terms(), **self.regularizer_diagnostics()}
        if self.on_nonfinite == "skip" and "loss" in logs:
            logs = {**logs, "regtune/nonfinite_skipped_steps": self.nonfinite_skipped_steps}
        super().log(logs, *args, **kwargs)

    def _regtune_log_term(self, key: str, value: torch.Tensor, scaled_for_ga: bool = False) -> None:
        """Add a micro-batch's loss term to the sums logged as its mean (kept on the device: no host sync per step)."""
        value = value.detach().float()
        if scaled_for_ga:  # a loss already divided for accumulation: back to the micro-batch's own value
            value = value * self._regtune_ga_steps()
        total, count = self._regtune_term_sums.get(key, (0.0, 0))
        self._regtune_term_sums[key] = (total + value, count + 1)

    def _regtune_logged_terms(self) -> dict[str, float]:
        """The mean of each loss term over the micro-batches since the last log (averaged over processes), reset."""
        sums, self._regtune_term_sums = self._regtune_term_sums, {}
        if not sums:
            return {}
        means = torch.stack([torch.as_tensor(total, dtype=torch.float32) / count for total, count in sums.values()])
        if self.accelerator.num_processes > 1:  # every process logs training metrics together (like `loss`)
            means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean")
        return dict(zip(sums, means.tolist()))

    def regularizer_diagnostics(self) -> dict[str, float]:
        """Collect every regularizer's [`Regularizer.diagnostics`] as `{"<name>/<key>": float}` (resets them)."""
        out: dict[str, float] = {}
        for reg in self.regularizers:
            if not reg.log_diagnostics:
                continue
            for key, value in reg.diagnostics().items():
                out[f"{reg.name}/{key}"] = float(value.item() if isinstance(value, torch.Tensor) else value)
        return out

    # ---- non-finite guard ----

    def _regtune_guard_reset(self) -> None:
        self._regtune_watched: list[tuple[int, str, torch.Tensor]] = []
        self._regtune_micro_batch = 0
        self._regtune_grad_norm: torch.Tensor | None = None

    def _regtune_watch(self, label: str, value: Any) -> None:
        """Keep `value` (a loss or a term of the current micro-batch) for the check before the optimizer step."""
        if self.on_nonfinite == "ignore" or value is None:
            return
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = (value.float().sum() if value.numel() != 1 else value.reshape(())).float()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        else:
            return
        self._regtune_watched.append((self._regtune_micro_batch, label, value))

    def _get_grad_norm(self, model, grad_norm=None):
        # the Trainer's gradient norm of the step (computed anyway, right before `on_pre_optimizer_step`), kept for
        # the guard; never read here
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.on_nonfinite != "ignore" and grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            self._regtune_grad_norm = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
        return grad_norm

    def _regtune_check_finite(self, state) -> None:
        """Called once per optimizer step, before it: one host read of everything kept since the last step."""
        watched, micro_batches, grad_norm = self._regtune_watched, self._regtune_micro_batch, self._regtune_grad_norm
        self._regtune_guard_reset()
        if self.on_nonfinite == "ignore":
            return
        entries = [(index, label) for index, label, _ in watched]
        values = [value for _, _, value in watched]
        # fp16 AMP: the gradient scaler detects overflowing gradients and skips those steps itself
        if grad_norm is not None and getattr(self.accelerator, "scaler", None) is None:
            entries.append((None, "gradient norm"))
            values.append(grad_norm)
        distributed = self.accelerator.num_processes > 1
        if not values and not distributed:
            return
        device = values[0].device if values else self.args.device
        stacked = (
            torch.stack([value.to(device=device, dtype=torch.float32).reshape(()) for value in values])
            if values
            else torch.zeros(0, device=device)
        )
        flag = (~torch.isfinite(stacked)).any().to(torch.float32).reshape(1)
        if distributed:
            # every process must take the same decision (a rank that raises alone would leave the others waiting)
            flag = self.accelerator.reduce(flag, reduction="sum")
        host = torch.cat([stacked, flag]).cpu()  # the one host sync of the guard per optimizer step
        if host[-1].item() == 0:
            return
        step = state.global_step + 1
        bad = [
            f"{label} = {host[i].item()}"
            + (f" (micro-batch {index} of {micro_batches})" if index is not None and micro_batches > 1 else "")
            for i, (index, label) in enumerate(entries)
            if not torch.isfinite(host[i])
        ]
        where = f"optimizer step {step} (global_step {state.global_step} -> {step})"
        if bad:
            first, rest = bad[0], bad[1:]
            message = f"Non-finite value at {where}: {first}."
            if rest:
                message += f" Also non-finite in that step: {'; '.join(rest)}."
        else:
            message = f"Non-finite value at {where} on another process (this process's values are finite)."
        if self.on_nonfinite == "skip":
            # no gradient, no update: torch optimizers skip parameters whose `grad` is None (weights, moments and
            # their step counts stay as they were)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self.nonfinite_skipped_steps += 1
            logger.warning(
                "%s Skipped this optimizer step (on_nonfinite='skip'): the weights and the optimizer state are "
                "unchanged; %d step(s) skipped so far.",
                message,
                self.nonfinite_skipped_steps,
            )
            return
        raise NonFiniteLossError(
            f"{message} The weights were not updated at this step. Typical causes: a bad batch (NaN/inf inputs, or "
            "labels that are all ignored, which gives 0/0), a learning rate too high for the model, an overflowing "
            "half-precision forward, a regularizer weight too large. Pass `on_nonfinite='skip'` to the trainer to "
            "skip such steps and count them (logged as `regtune/nonfinite_skipped_steps`), or 'ignore' to turn the guard off."
        )

    # ---- checkpoints ----

    def _save_checkpoint(self, model, trial) -> None:
        # A checkpoint is training state: adapters that publish a compressed form (mask tuning's bit-packed masks)
        # keep their full trainable state here, so that a resumed run continues exactly.
        with training_hooks.checkpoint_context():
            super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The regularizers' state is resumable training state, like the optimizer's: written with it (skipped with
        # `save_only_model`, as resuming is then impossible anyway), by every process, before trainer_state.json.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.regularizers:
            self._regtune_save_state(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.regularizers:
            self._regtune_pending_state = self._regtune_read_state(checkpoint)

    def _regtune_save_state(self, output_dir: str) -> None:
        payload = {
            "format": _STATE_FORMAT,
            "world_size": self.args.world_size,
            "process_index": self.args.process_index,
            "regularizers": {reg.name: reg.state_dict() for reg in self.regularizers},
        }
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, regularizer_state_file(self.args.world_size, self.args.process_index))
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def _regtune_read_state(self, checkpoint: str) -> dict | None:
        candidates = [regularizer_state_file(self.args.world_size, self.args.process_index)]
        candidates += [REGULARIZERS_STATE_NAME, regularizer_state_file(2, 0)]  # resumed with another world size
        for name in dict.fromkeys(candidates):
            path = os.path.join(checkpoint, name)
            if os.path.isfile(path):
                if name != candidates[0]:
                    logger.warning(
                        "Resuming regularizers from %s written by another number of processes; per-process state "
                        "(if any) is taken from that file.",
                        path,
                    )
                return self._regtune_load_state_file(path)
        stateful = [reg.name for reg in self.regularizers if reg.state_dict()]
        if stateful:
            logger.warning(
                "Checkpoint %s has no %s: the regularizers %s start from a fresh state, so the resumed run will not "
                "continue exactly.",
                checkpoint,
                REGULARIZERS_STATE_NAME,
                stateful,
            )
        return None

    def _regtune_load_state_file(self, path: str) -> dict:
        """Read a regularizer-state file with `weights_only=True`; a damaged one raises a `RegularizerStateError`."""
        names = [reg.name for reg in self.regularizers]
        where = f"The regularizer state file {path} (state of the regularizers {names})"
        if os.path.getsize(path) == 0:
            raise RegularizerStateError(
                f"{where} is empty (0 bytes): the checkpoint was cut off while being written, or the file was "
                "replaced. Resume from an earlier checkpoint, or delete the file to restart these regularizers from a "
                "fresh state (the resumed run will then not continue exactly)."
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message advises turning safe loading off, which would run any code a crafted file holds: not
            # passed on
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            reason = (
                f"it holds an object that is not a tensor or a Python primitive ({found.group(1)})"
                if found
                else "it is not a torch.save file holding only tensors and Python primitives"
            )
            raise RegularizerStateError(
                f"{where} cannot be read safely: {reason}. regtune reads regularizer state with "
                "`torch.load(weights_only=True)` only, so a file it did not write (or a damaged or tampered one) is "
                "refused. Resume from another checkpoint, or delete the file to restart these regularizers fresh."
            ) from None
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for a damaged archive
            detail = f"{type(err).__name__}: {err}".split("\n", 1)[0]
            if "weights_only" in detail:
                detail = type(err).__name__
            raise RegularizerStateError(
                f"{where} is damaged: it is not a readable torch file ({detail}). Resume from another checkpoint, or "
                "delete the file to restart these regularizers fresh."
            ) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("regularizers"), dict):
            raise RegularizerStateError(
                f"{where} does not hold regtune regularizer state (a dict with a 'regularizers' mapping), got "
                f"{type(payload).__name__}"
                + (f" with keys {sorted(map(str, payload))}" if isinstance(payload, dict) else "")
                + "."
            )
        version = payload.get("format", _STATE_FORMAT)
        if version != _STATE_FORMAT:
            raise RegularizerStateError(
                f"{where} has format {version!r}; this regtune reads format {_STATE_FORMAT} (a file from another "
                "regtune version)."
            )
        for name, state in payload["regularizers"].items():
            if not isinstance(state, dict):
                raise RegularizerStateError(
                    f"{where}: the state of regularizer {name!r} must be a dict, got {type(state).__name__}."
                )
        payload["path"] = path
        return payload

    def _regtune_apply_state(self, payload: dict) -> None:
        states = payload.get("regularizers", {})
        path = payload.get("path", REGULARIZERS_STATE_NAME)
        for reg in self.regularizers:
            if reg.name in states:
                problems = _state_problems(states[reg.name], reg.state_dict())
                if problems:
                    raise RegularizerStateError(
                        f"The regularizer state file {path} does not fit regularizer {reg.name!r} "
                        f"({type(reg).__name__}): {'; '.join(problems)}. The file is damaged or was written by a "
                        "run with other settings; resume from another checkpoint, or delete the file to restart the "
                        "regularizers fresh."
                    )
                try:
                    reg.load_state_dict(states[reg.name])
                except Exception as err:  # noqa: BLE001 - whatever the regularizer's own loader raises
                    raise RegularizerStateError(
                        f"The regularizer state file {path}: regularizer {reg.name!r} ({type(reg).__name__}) could not "
                        f"load its state: {type(err).__name__}: {err}"
                    ) from err
            elif reg.state_dict():
                logger.warning("The checkpoint holds no state for regularizer %r: it starts fresh.", reg.name)
        unknown = sorted(set(states) - {reg.name for reg in self.regularizers})
        if unknown:
            logger.warning("The checkpoint holds state for regularizers %s that this trainer does not have.", unknown)
