"""A dropout schedule: set every dropout probability of the model at run time, step by step."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from transformers import TrainerCallback

from regtune.functional.dropout import (
    DROPOUT_KINDS,
    DROPOUT_SCHEDULE_MODES,
    dropout_sites,
    get_dropout_values,
    restore_dropout,
    scheduled_dropout_rate,
    set_dropout,
)

from .base import Regularizer


logger = logging.getLogger(__name__)


def _check_rate(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"DropoutSchedule: `{field}` must be a number in [0, 1), got {value!r}.")


class DropoutSchedule(Regularizer):
    """
    Schedule the dropout probability of the whole model over training: constant, linear ramp, or switched on at a step
    ("To Repeat or Not To Repeat", Xue et al. 2023, https://arxiv.org/abs/2305.13230: dropout is the regularizer that
    reliably reduces multi-epoch degradation, and it can be introduced late or gradually).

    At the start of every optimizer step the callback sets, through [`~regtune.functional.dropout.set_dropout`], the
    `p` of every `nn.Dropout` module, the dropout float attributes that attention modules copy from the config (e.g.
    Llama's `attention_dropout`) and the config fields that some models read in `forward`, to
    `scheduled_dropout_rate(global_step, ...)`. The rate is a pure function of `state.global_step`, which the Trainer
    checkpoints, so a resumed run continues the schedule exactly (the regularizer has no state of its own). When
    training ends the original values are put back, so the saved model and its `config.json` are unchanged.

    Modules that a model replaced by `nn.Identity` because their rate was 0 at construction cannot be switched on:
    build such models with a non-zero rate (e.g. peft `lora_dropout=0.1`) or use a model that keeps `nn.Dropout`.
    Multi-sample dropout reads the rate of the dropout before the head at every step, so the two compose.

    Args:
        p (`float`): the target rate, in [0, 1).
        mode (`str`, defaults to `"constant"`): `"constant"` (`p` throughout), `"linear"` (ramp from `start_p` at the
            start to `p` at the end) or `"step"` (`start_p` before the start, `p` from it on).
        start_p (`float`, defaults to `0.0`): the rate before the schedule starts (`"linear"`, `"step"`).
        start_step (`int`, *optional*): the step where the ramp starts / the switch happens. Defaults to 0 for
            `"linear"`; `"step"` needs it or `start_fraction`.
        end_step (`int`, *optional*): the step where the linear ramp reaches `p`.
        start_fraction (`float`, *optional*): `start_step` as a fraction of `max_steps`, in [0, 1].
        end_fraction (`float`, *optional*): `end_step` as a fraction of `max_steps`, in (0, 1].
        kinds (`Iterable[str]`, defaults to all): which dropout places to set, a subset of
            `("modules", "attributes", "config")`.
    """

    name = "dropout_schedule"

    def __init__(
        self,
        p: float,
        mode: str = "constant",
        start_p: float = 0.0,
        start_step: int | None = None,
        end_step: int | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        kinds: Iterable[str] = DROPOUT_KINDS,
    ):
        if mode not in DROPOUT_SCHEDULE_MODES:
            raise ValueError(f"DropoutSchedule: `mode` must be one of {list(DROPOUT_SCHEDULE_MODES)}, got {mode!r}.")
        _check_rate("p", p)
        _check_rate("start_p", start_p)
        kinds = tuple(kinds)
        if not kinds or any(kind not in DROPOUT_KINDS for kind in kinds):
            raise ValueError(
                f"DropoutSchedule: `kinds` must be a non-empty subset of {list(DROPOUT_KINDS)}, got {list(kinds)}."
            )
        for field, value in (("start_step", start_step), ("end_step", end_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"DropoutSchedule: `{field}` must be an integer >= 0, got {value!r}.")
        for field, value in (("start_fraction", start_fraction), ("end_fraction", end_fraction)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
            ):
                raise ValueError(f"DropoutSchedule: `{field}` must be a number in [0, 1], got {value!r}.")
        if start_step is not None and start_fraction is not None:
            raise ValueError("DropoutSchedule: give at most one of `start_step` and `start_fraction`.")
        if end_step is not None and end_fraction is not None:
            raise ValueError("DropoutSchedule: give at most one of `end_step` and `end_fraction`.")
        has_start = start_step is not None or start_fraction is not None
        has_end = end_step is not None or end_fraction is not None
        if mode == "constant" and (has_start or has_end or start_p != 0.0):
            raise ValueError(
                "DropoutSchedule: mode='constant' takes only `p`; `start_p`, `start_step`, `end_step`, "
                "`start_fraction` and `end_fraction` apply to mode='linear' or mode='step'."
            )
        if mode == "step":
            if not has_start:
                raise ValueError("DropoutSchedule: mode='step' needs `start_step` or `start_fraction`.")
            if has_end:
                raise ValueError(
                    "DropoutSchedule: mode='step' takes no `end_step`/`end_fraction` (use mode='linear')."
                )
        if mode == "linear":
            if not has_end:
                raise ValueError("DropoutSchedule: mode='linear' needs `end_step` or `end_fraction`.")
            if start_step is not None and end_step is not None and end_step <= start_step:
                raise ValueError(f"DropoutSchedule: `end_step` ({end_step}) must be > `start_step` ({start_step}).")
            if start_fraction is not None and end_fraction is not None and end_fraction <= start_fraction:
                raise ValueError(
                    f"DropoutSchedule: `end_fraction` ({end_fraction}) must be > `start_fraction` ({start_fraction})."
                )
        self.p = float(p)
        self.mode = mode
        self.start_p = float(start_p)
        self.start_step = start_step
        self.end_step = end_step
        self.start_fraction = start_fraction
        self.end_fraction = end_fraction
        self.kinds = kinds
        self._sites: list[tuple[object, str]] = []
        self._original: list[float] = []
        self._current: float | None = None
        self._attached = False

    def resolve_steps(self, max_steps: int) -> tuple[int, int | None]:
        """Return `(start_step, end_step)` in optimizer steps for a run of `max_steps` steps."""
        start = self.start_step
        if start is None:
            start = round(self.start_fraction * max_steps) if self.start_fraction is not None else 0
        end = self.end_step
        if end is None and self.end_fraction is not None:
            end = round(self.end_fraction * max_steps)
        if self.mode == "linear" and end <= start:
            end = start + 1  # a run too short for the fractions: switch within one step
        return start, end

    def rate(self, step: int, max_steps: int) -> float:
        """The dropout probability during optimizer step `step` of a `max_steps`-step run."""
        start, end = self.resolve_steps(max_steps)
        return scheduled_dropout_rate(step, self.p, self.mode, self.start_p, start, end)

    def setup(self, trainer) -> None:
        self.attach(trainer.model)

    def attach(self, model) -> None:
        """Find (once per `train()` call) the dropout places of `model` and record their original values."""
        if self._attached:
            restore_dropout(self._sites, self._original)
        self._sites = dropout_sites(model, self.kinds)
        self._original = get_dropout_values(self._sites)
        self._current = None
        self._attached = True
        if not self._sites:
            logger.warning(
                "DropoutSchedule found no dropout to set in %s (kinds=%s): the schedule has no effect. Models built "
                "with a dropout rate of 0 may hold nn.Identity instead of nn.Dropout.",
                type(model).__name__,
                list(self.kinds),
            )

    def apply(self, step: int, max_steps: int) -> float:
        """Set the rate of optimizer step `step` on the attached model (only when it changed); return it."""
        rate = self.rate(step, max_steps)
        if rate != self._current:
            set_dropout(None, rate, sites=self._sites)
            self._current = rate
        return rate

    def detach(self) -> None:
        """Put the original dropout values back."""
        restore_dropout(self._sites, self._original)
        self._sites, self._original, self._current = [], [], None
        self._attached = False

    def callbacks(self) -> list[TrainerCallback]:
        return [DropoutScheduleCallback(self)]

    def __repr__(self) -> str:
        return f"DropoutSchedule(p={self.p}, mode={self.mode!r}, start_p={self.start_p})"


class DropoutScheduleCallback(TrainerCallback):
    """Applies a [`DropoutSchedule`] at the start of training and of every optimizer step; restores at the end."""

    def __init__(self, schedule: DropoutSchedule):
        self.schedule = schedule

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.schedule._attached and model is not None:
            self.schedule.attach(model)  # used as a plain callback, without the mixin's `setup`
        self.schedule.apply(state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.apply(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.detach()
