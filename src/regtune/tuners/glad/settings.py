"""`GLADSettings`: GLAD's knobs, defined and validated once, shared by the adapter config, the trainer config and the
regularizer (see docs/glad.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_error(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> str | None:
    """
    Return an error message for `value` unless it is a finite number (an `int` when `integer`) in the given range.

    The message names the field and its allowed values, e.g. "`rho` = inf (allowed: a finite number > 0)".
    """
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        allowed = f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{kind} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"{kind} {'<' if high_open else '<='} {high:g}"
    else:
        allowed = kind
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else _is_number(value)
    if ok:
        number = float(value)
        ok = math.isfinite(number)
        if ok and low is not None:
            ok = number > low if low_open else number >= low
        if ok and high is not None:
            ok = number < high if high_open else number <= high
    return None if ok else f"`{name}` = {value!r} (allowed: {allowed})"


def bool_error(name: str, value: Any) -> str | None:
    """Return an error message for `value` unless it is a `bool`."""
    return None if isinstance(value, bool) else f"`{name}` = {value!r} (allowed: True or False)"


def raise_field_errors(owner: str, errors: list[str | None]) -> None:
    """Raise one `ValueError` listing every error of `errors` (the `None`s are skipped), if there is any."""
    errors = [error for error in errors if error]
    if errors:
        raise ValueError(f"{owner}: invalid value(s): " + "; ".join(errors) + ".")


@dataclass(frozen=True)
class GLADSettings:
    """
    GLAD's knobs ([paper](https://huggingface.co/papers/2507.13089)), validated once, at construction. The adapter
    config ([`GLADConfig`]), the trainer config ([`GLADTrainingArguments`], as `glad_<field>`) and the regularizer
    ([`regtune.regularizers.GLADRegularizer`]) all hold one of these. What GLAD computes is described in docs/glad.md.

    Args:
        rho (`float`, defaults to `0.05`):
            Radius of the sharpness-aware perturbation `eps = rho * g / ||g||` (global L2 norm over all trainable
            parameters). A finite number > 0.
        glad_lambda (`float`, defaults to `0.5`):
            Weight of the sharpness-aware reference gradient: `g_final = g + glad_lambda * (g_sam - g)`. 0 is plain
            training (the second pass is skipped), 1 is SAM. A finite number in [0, 1].
        share_dropout_masks (`bool`, defaults to `True`):
            Whether the second (perturbed) forward pass reuses the random numbers of the first one, so that both
            passes drop the same units. The reference SAM implementation draws both passes' dropout from one
            random key; with independent masks `g_sam - g` is dominated by dropout noise. `False` draws fresh
            masks for the second pass.

    Raises:
        `ValueError`: naming every invalid field and its allowed values.
    """

    rho: float = field(default=0.05, metadata={"help": "SAM perturbation radius: a finite number > 0."})
    glad_lambda: float = field(
        default=0.5,
        metadata={"help": "Weight of the SAM reference gradient, in [0, 1]: 0 = plain training, 1 = SAM."},
    )
    share_dropout_masks: bool = field(
        default=True,
        metadata={"help": "Whether the perturbed pass reuses the first pass's dropout masks (True, as SAM's code)."},
    )

    def __post_init__(self):
        raise_field_errors("GLADSettings", self.field_errors(dataclasses.asdict(self)))
        # store floats (an int rho is accepted as a number)
        object.__setattr__(self, "rho", float(self.rho))
        object.__setattr__(self, "glad_lambda", float(self.glad_lambda))

    @staticmethod
    def field_errors(values: dict[str, Any], names: dict[str, str] | None = None) -> list[str]:
        """
        The validation errors of `values` (a mapping field -> value; absent fields are not checked), each naming the
        field as `names` spells it (e.g. `{"rho": "glad_rho"}` for the trainer config), else by its own name.
        """
        names = names or {}
        checks = {
            "rho": lambda name, v: number_error(name, v, low=0.0, low_open=True),
            "glad_lambda": lambda name, v: number_error(name, v, low=0.0, high=1.0),
            "share_dropout_masks": bool_error,
        }
        errors = []
        for key, check in checks.items():
            if key in values:
                error = check(names.get(key, key), values[key])
                if error:
                    errors.append(error)
        return errors

    def replace(self, **changes: Any) -> GLADSettings:
        """A copy with `changes` applied (the `None` values are ignored), validated."""
        changes = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_model(cls, model: Any) -> GLADSettings:
        """The settings recorded in the model's [`GLADConfig`] (its first adapter config that has them), else the
        defaults."""
        for config in getattr(model, "peft_config", {}).values():
            settings = getattr(config, "glad_settings", None)
            if isinstance(settings, GLADSettings):
                return settings
        return cls()


SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(GLADSettings))


def settings_field(name: str, *, optional: bool = False):
    """
    A `dataclasses.field` for `GLADSettings.<name>` in another config class, with the default and help text defined
    once in [`GLADSettings`]. `optional` makes the default `None` ("take it from the model's GLADConfig").
    """
    source = next(f for f in dataclasses.fields(GLADSettings) if f.name == name)
    help_text = source.metadata["help"]
    if optional:
        help_text += f" Default: the model's GLADConfig.{name}, else {source.default!r}."
        return field(default=None, metadata={"help": help_text})
    return field(default=source.default, metadata={"help": help_text})
