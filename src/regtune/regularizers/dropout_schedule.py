"""A dropout schedule: set every dropout probability of the model at run time, step by step, per type of dropout."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from transformers import TrainerCallback

from regtune.functional._checks import is_int, is_rate, is_real, raise_field_errors, str_subset
from regtune.functional.dropout import (
    DROPOUT_KINDS,
    DROPOUT_SCHEDULE_MODES,
    DROPOUT_TYPES,
    get_dropout_values,
    restore_dropout,
    scheduled_dropout_rate,
    set_dropout,
    typed_dropout_sites,
)

from .base import Regularizer


logger = logging.getLogger(__name__)


def _check_rates(field: str, value, errors: list[str]) -> dict[str, float] | float | None:
    """A rate in [0, 1), or a mapping of dropout types to rates; returns floats (None after adding to `errors`)."""
    if isinstance(value, Mapping):
        if not value:
            errors.append(f"`{field}` must name at least one of {list(DROPOUT_TYPES)}")
            return None
        unknown = [key for key in value if key not in DROPOUT_TYPES]
        if unknown:
            errors.append(f"`{field}` has unknown dropout type(s) {unknown}; allowed: {list(DROPOUT_TYPES)}")
        rates = {}
        for key, rate in value.items():
            if not is_rate(rate, upper_inclusive=False):
                errors.append(f"`{field}.{key}` must be a number in [0, 1), got {rate!r}")
            elif key in DROPOUT_TYPES:
                rates[key] = float(rate)
        return rates
    if not is_rate(value, upper_inclusive=False):
        errors.append(
            f"`{field}` must be a number in [0, 1) or a mapping of dropout types {list(DROPOUT_TYPES)} to such "
            f"numbers, got {value!r}"
        )
        return None
    return float(value)


def steps_per_epoch_of(train_dataloader, gradient_accumulation_steps: int = 1) -> int | None:
    """Optimizer steps per epoch as the Trainer counts them (`None` for a dataloader without a length)."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    ga = max(int(gradient_accumulation_steps), 1)
    return max(batches // ga + int(batches % ga > 0), 1)


class DropoutSchedule(Regularizer):
    """
    Schedule the dropout probabilities of a model over training: constant, linear ramp, or switched on at a step or an
    epoch, with one rate for all dropout or one per type (attention, hidden, embedding, classifier, LoRA)
    ("To Repeat or Not To Repeat", Xue et al. 2023, https://arxiv.org/abs/2305.13230: dropout is the regularizer that
    reliably reduces multi-epoch degradation, and it can be introduced late or gradually).

    At the start of training and of every optimizer step, [`DropoutScheduleCallback`] sets, through
    [`~regtune.functional.dropout.set_dropout`], the `p` of every `nn.Dropout` module, the dropout float attributes
    that attention modules copy from the config (e.g. Llama's `attention_dropout`) and the config fields that some
    models read in `forward`, to the scheduled rate of their type
    ([`~regtune.functional.dropout.dropout_type`]: `"attention"`, `"hidden"`, `"embedding"`, `"classifier"`,
    `"lora"`). The rate is a pure function of `state.global_step` (and of the run's length and steps per epoch), which
    the Trainer checkpoints, so a resumed run continues the schedule exactly (the regularizer has no state of its
    own). When training ends the original values are put back, so the saved model and its `config.json` are unchanged.

    Use it as a regtune regularizer (`RegTrainer(..., regularizers=[DropoutSchedule(...)])`, or
    `{type: dropout_schedule, ...}` in a recipe) or as a plain callback of any `transformers.Trainer`:
    `Trainer(..., callbacks=[DropoutScheduleCallback(p=0.1, mode="step", start_epoch=2)])`.

    Modules that a model replaced by `nn.Identity` because their rate was 0 at construction cannot be switched on:
    build such models with a non-zero rate (e.g. peft `lora_dropout=0.1`) or use a model that keeps `nn.Dropout`.
    Llama-family models have no hidden or embedding dropout: add it with
    [`~regtune.functional.dropout.add_hidden_dropout`]. Multi-sample dropout reads the rate of the dropout before the
    head at every step, so the two compose.

    Args:
        p (`float` or `dict[str, float]`): the target rate, in [0, 1): one number for every dropout of the model, or a
            mapping from dropout types to rates (e.g. `{"attention": 0.0, "hidden": 0.1, "lora": 0.05}`); types not in
            the mapping are left alone.
        mode (`str`, defaults to `"constant"`): `"constant"` (`p` throughout), `"linear"` (ramp from `start_p` at the
            start to `p` at the end) or `"step"` (`start_p` before the start, `p` from it on).
        start_p (`float` or `dict[str, float]`, defaults to `0.0`): the rate before the schedule starts (`"linear"`,
            `"step"`); a mapping gives it per type (missing types start at 0).
        start_step (`int`, *optional*): the optimizer step where the ramp starts / the switch happens. Defaults to 0
            for `"linear"`; `"step"` needs it, `start_fraction` or `start_epoch`.
        end_step (`int`, *optional*): the step where the linear ramp reaches `p`.
        start_fraction (`float`, *optional*): the start as a fraction of `max_steps`, in [0, 1].
        end_fraction (`float`, *optional*): the end as a fraction of `max_steps`, in (0, 1].
        start_epoch (`float`, *optional*): the start in epochs (`1` = after the first epoch; fractions allowed),
            converted to `round(start_epoch * steps_per_epoch)` optimizer steps with the Trainer's count of steps per
            epoch. Needs a training dataloader with a length.
        end_epoch (`float`, *optional*): the end of the linear ramp in epochs.
        kinds (`Iterable[str]`, defaults to all): which dropout places to set, a subset of
            `("modules", "attributes", "config")`.
    """

    name = "dropout_schedule"

    def __init__(
        self,
        p: float | dict[str, float],
        mode: str = "constant",
        start_p: float | dict[str, float] = 0.0,
        start_step: int | None = None,
        end_step: int | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        kinds: Iterable[str] = DROPOUT_KINDS,
    ):
        errors: list[str] = []
        if not isinstance(mode, str) or mode not in DROPOUT_SCHEDULE_MODES:
            errors.append(f"`mode` must be one of {list(DROPOUT_SCHEDULE_MODES)}, got {mode!r}")
        p = _check_rates("p", p, errors)
        start_p = _check_rates("start_p", start_p, errors)
        types = tuple(p) if isinstance(p, dict) else DROPOUT_TYPES
        if isinstance(start_p, dict) and p is not None:
            extra = [key for key in start_p if key not in types]
            if extra:
                errors.append(f"`start_p` names type(s) {extra} that `p` does not schedule ({list(types)})")
        checked_kinds = str_subset(kinds, DROPOUT_KINDS)
        if checked_kinds is None:
            errors.append(f"`kinds` must be a non-empty subset of {list(DROPOUT_KINDS)}, got {kinds!r}")
        given = {
            "start_step": start_step,
            "start_fraction": start_fraction,
            "start_epoch": start_epoch,
            "end_step": end_step,
            "end_fraction": end_fraction,
            "end_epoch": end_epoch,
        }
        bad = set()
        for field, value in given.items():
            if value is None:
                continue
            if field.endswith("_step"):
                ok, allowed = is_int(value) and value >= 0, "an integer >= 0"
            elif field.endswith("_fraction"):
                ok, allowed = is_real(value) and 0 <= value <= 1, "a number in [0, 1]"
            else:
                ok, allowed = is_real(value) and value >= 0, "a finite number >= 0"
            if not ok:
                bad.add(field)
                errors.append(f"`{field}` must be None or {allowed}, got {value!r}")
        starts = [name for name, value in given.items() if name.startswith("start") and value is not None]
        ends = [name for name, value in given.items() if name.startswith("end") and value is not None]
        for which, names in (("start", starts), ("end", ends)):
            if len(names) > 1:
                errors.append(
                    f"give at most one of `{which}_step`, `{which}_fraction` and `{which}_epoch`, got {names}"
                )
        start_p_values = start_p.values() if isinstance(start_p, dict) else [start_p]
        if mode == "constant" and (starts or ends or any(value not in (0.0, None) for value in start_p_values)):
            errors.append(
                "mode='constant' takes only `p`; `start_p`, `start_step`, `end_step`, `start_fraction`, "
                "`end_fraction`, `start_epoch` and `end_epoch` apply to mode='linear' or mode='step'"
            )
        if mode == "step":
            if not starts:
                errors.append("mode='step' needs `start_step` or `start_fraction` (or `start_epoch`)")
            if ends:
                errors.append("mode='step' takes no `end_step`/`end_fraction`/`end_epoch` (use mode='linear')")
        if mode == "linear":
            if not ends:
                errors.append("mode='linear' needs `end_step` or `end_fraction` (or `end_epoch`)")
            for unit in ("step", "fraction", "epoch"):
                low, high = f"start_{unit}", f"end_{unit}"
                low_value, high_value = given[low], given[high]
                if low_value is None or high_value is None or {low, high} & bad:
                    continue
                if high_value <= low_value:
                    errors.append(f"`{high}` ({high_value}) must be > `{low}` ({low_value})")
        raise_field_errors("DropoutSchedule", errors)
        kinds = checked_kinds
        self.p = p
        self.mode = mode
        self.start_p = start_p
        self.start_step = start_step
        self.end_step = end_step
        self.start_fraction = start_fraction
        self.end_fraction = end_fraction
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.kinds = kinds
        self.types = types
        self._sites: dict[str, list[tuple[object, str]]] = {}
        self._original: dict[str, list[float]] = {}
        self._current: dict[str, float] = {}
        self._attached = False

    @property
    def uses_epochs(self) -> bool:
        """Whether the schedule is given in epochs (it then needs the number of optimizer steps per epoch)."""
        return self.start_epoch is not None or self.end_epoch is not None

    def resolve_steps(self, max_steps: int, steps_per_epoch: int | None = None) -> tuple[int, int | None]:
        """
        Return `(start_step, end_step)` in optimizer steps for a run of `max_steps` steps (`steps_per_epoch` optimizer
        steps per epoch, needed when the schedule is given in epochs).
        """
        if self.uses_epochs and not steps_per_epoch:
            raise ValueError(
                "DropoutSchedule: `start_epoch`/`end_epoch` need the number of optimizer steps per epoch; the training "
                "dataloader has no length (an IterableDataset?). Give `start_step`/`start_fraction` instead."
            )
        if self.start_step is not None:
            start = self.start_step
        elif self.start_fraction is not None:
            start = round(self.start_fraction * max_steps)
        elif self.start_epoch is not None:
            start = round(self.start_epoch * steps_per_epoch)
        else:
            start = 0
        end = self.end_step
        if self.end_fraction is not None:
            end = round(self.end_fraction * max_steps)
        elif self.end_epoch is not None:
            end = round(self.end_epoch * steps_per_epoch)
        if self.mode == "linear" and end <= start:
            end = start + 1  # a run too short for the fractions: switch within one step
        return start, end

    def target(self, type_: str) -> tuple[float, float]:
        """`(start_p, p)` of dropout type `type_`."""
        p = self.p[type_] if isinstance(self.p, dict) else self.p
        start_p = self.start_p.get(type_, 0.0) if isinstance(self.start_p, dict) else self.start_p
        return start_p, p

    def rates(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> dict[str, float]:
        """The dropout probability of each scheduled type during optimizer step `step` of a `max_steps`-step run."""
        start, end = self.resolve_steps(max_steps, steps_per_epoch)
        out = {}
        for type_ in self.types:
            start_p, p = self.target(type_)
            out[type_] = scheduled_dropout_rate(step, p, self.mode, start_p, start, end)
        return out

    def rate(self, step: int, max_steps: int, steps_per_epoch: int | None = None, type: str | None = None) -> float:  # noqa: A002
        """
        The dropout probability during optimizer step `step` of a `max_steps`-step run: of dropout type `type`, which
        may be left out when one rate covers all types.
        """
        if type is None:
            if isinstance(self.p, dict) or isinstance(self.start_p, dict):
                raise ValueError(
                    f"DropoutSchedule.rate: this schedule has one rate per type; pass `type` (one of {list(self.types)})."
                )
            type = self.types[0]  # noqa: A001
        if type not in self.types:
            raise ValueError(f"DropoutSchedule.rate: `type` must be one of {list(self.types)}, got {type!r}.")
        return self.rates(step, max_steps, steps_per_epoch)[type]

    def setup(self, trainer) -> None:
        self.attach(trainer.model)

    def attach(self, model) -> None:
        """Find (once per `train()` call) the dropout places of `model` and record their original values."""
        if self._attached:
            self.detach()
        self._sites = {type_: [] for type_ in self.types}
        for obj, name, type_ in typed_dropout_sites(model, self.kinds):
            if type_ in self._sites:
                self._sites[type_].append((obj, name))
        self._original = {type_: get_dropout_values(sites) for type_, sites in self._sites.items()}
        self._current = {}
        self._attached = True
        if not any(self._sites.values()):
            logger.warning(
                "DropoutSchedule found no dropout to set in %s (kinds=%s, types=%s): the schedule has no effect. Models "
                "built with a dropout rate of 0 may hold nn.Identity instead of nn.Dropout; Llama-family models have "
                "no hidden dropout (see regtune.functional.dropout.add_hidden_dropout).",
                type(model).__name__,
                list(self.kinds),
                list(self.types),
            )
        elif isinstance(self.p, dict):
            missing = [type_ for type_, sites in self._sites.items() if not sites]
            if missing:
                logger.warning(
                    "DropoutSchedule: %s has no dropout of type(s) %s; their rates have no effect.",
                    type(model).__name__,
                    missing,
                )

    def sites(self, type_: str | None = None) -> list[tuple[object, str]]:
        """The attached places (of one type, or all), as `(object, attribute_name)` pairs."""
        if type_ is not None:
            return list(self._sites.get(type_, []))
        return [site for sites in self._sites.values() for site in sites]

    def apply(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> dict[str, float]:
        """Set the rates of optimizer step `step` on the attached model (where they changed); return them by type."""
        rates = self.rates(step, max_steps, steps_per_epoch)
        for type_, rate in rates.items():
            if self._current.get(type_) != rate:
                set_dropout(None, rate, sites=self._sites.get(type_, []))
                self._current[type_] = rate
        return rates

    def diagnostics(self) -> dict[str, float]:
        """The dropout probability in effect during the last optimizer step: `dropout_schedule/p` (one rate for every
        type), or `dropout_schedule/p_<type>` per type (a schedule with one rate per type)."""
        if not self._current:
            return {}
        if isinstance(self.p, dict) or isinstance(self.start_p, dict):
            return {f"p_{type_}": rate for type_, rate in self._current.items()}
        return {"p": next(iter(self._current.values()))}

    def detach(self) -> None:
        """Put the original dropout values back."""
        for type_, sites in self._sites.items():
            restore_dropout(sites, self._original.get(type_, []))
        self._sites, self._original, self._current = {}, {}, {}
        self._attached = False

    def callbacks(self) -> list[TrainerCallback]:
        return [DropoutScheduleCallback(self)]

    def __repr__(self) -> str:
        return f"DropoutSchedule(p={self.p}, mode={self.mode!r}, start_p={self.start_p})"


class DropoutScheduleCallback(TrainerCallback):
    """
    A `transformers.TrainerCallback` that applies a [`DropoutSchedule`] at the start of training and of every
    optimizer step, and restores the model's original rates when training ends. Usable with any `Trainer`:

    ```py
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
    ...                   callbacks=[DropoutScheduleCallback(p=0.1, mode="step", start_epoch=2)])
    ```

    Args:
        schedule ([`DropoutSchedule`], *optional*): the schedule; or give its arguments as keywords instead.
        **kwargs: the arguments of [`DropoutSchedule`] (`p`, `mode`, `start_p`, `start_step`, ...).
    """

    def __init__(self, schedule: DropoutSchedule | None = None, **kwargs):
        if schedule is not None and kwargs:
            raise ValueError("DropoutScheduleCallback: give a DropoutSchedule or its arguments, not both.")
        if schedule is None:
            if not kwargs:
                raise ValueError("DropoutScheduleCallback: give a DropoutSchedule or its arguments (at least `p`).")
            schedule = DropoutSchedule(**kwargs)
        if not isinstance(schedule, DropoutSchedule):
            raise ValueError(
                f"DropoutScheduleCallback: `schedule` must be a DropoutSchedule (or give its arguments as keywords), "
                f"got {type(schedule).__name__}."
            )
        self.schedule = schedule
        self.steps_per_epoch: int | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self.schedule._attached and model is not None:
            self.schedule.attach(model)  # used as a plain callback, without the mixin's `setup`
        self.steps_per_epoch = (
            steps_per_epoch_of(train_dataloader, args.gradient_accumulation_steps)
            if train_dataloader is not None
            else None
        )
        self.schedule.apply(state.global_step, state.max_steps, self.steps_per_epoch)

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.apply(state.global_step, state.max_steps, self.steps_per_epoch)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.detach()
