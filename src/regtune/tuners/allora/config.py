"""Configuration of the ALLoRA adapter."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.utils import PeftType


ALLORA_COEFFICIENT_TARGETS = ("gradient", "update")
ALLORA_ROW_NORMS = ("product", "factors")
_BIAS_VALUES = ("none", "all", "lora_only")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_module_names(value: Any, allow_none: bool = True) -> bool:
    if value is None:
        return allow_none
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value)


@dataclass
class ALLoRAConfig(LoraConfig):
    """
    Configuration for ALLoRA: dropout-free, scaling-free LoRA with a norm-adaptive step
    ([paper](https://huggingface.co/papers/2410.09692); what is computed and measured: docs/allora.md).

    The adapter computes `h = W x + B A x` (no `lora_alpha / r` scaling, no dropout). During backward, the gradients
    reaching `A` and `B` are scaled per output row `i` of `dW = B A` by `c_i = 1 / sqrt(||dW_i||^2 + 1/eta^2)`; the
    gradient flowing to earlier layers is not scaled. Everything else (target_modules patterns incl. `"all-linear"`,
    `target_parameters`, `layers_to_transform`, several adapters, `adapter_names` mixed batches, merging) is peft's
    LoRA, on every layer type peft's LoRA supports (`nn.Linear`, transformers' `Conv1D`, `nn.Embedding`,
    `nn.Conv1d/2d/3d`, `nn.MultiheadAttention`, `target_parameters`); the docs page says what an output row is for
    each.

    Every field is validated at construction: one `ValueError` names each invalid field and its allowed values.

    Args:
        eta (`float`, defaults to `2.0`):
            The row coefficient at `dW = 0`, i.e. the initial step multiplier (it replaces `lora_alpha / r`). The
            paper searched `eta^2` in {1, 2, 4}. A finite number > 0. With SGD this is a step multiplier; under
            Adam(W) a slowly varying per-row gradient scale is largely normalized away, so with
            `coefficient_on="gradient"` the adapter trains almost exactly like LoRA with `lora_alpha=r` and no
            dropout (measured in docs/allora.md); `coefficient_on="update"` is the reading that changes Adam's
            dynamics.
        norm_squared (`bool`, defaults to `True`):
            Use `||dW_i||^2` (default, "inversely proportional to the l2 norm" for large rows) or the unsquared
            `||dW_i||` of a third-party reading.
        coefficient_on (`str`, defaults to `"gradient"`):
            `"gradient"`: the layer scales the gradients of `A` and `B` (the paper's description). `"update"`: the
            layer computes plain gradients and the optimizer scales the parameter *update* instead. regtune's
            trainers build that optimizer themselves; otherwise use [`create_allora_optimizer`]. Any other optimizer
            stepping such an adapter raises at its first step (never plain LoRA silently).
        row_norm (`str`, defaults to `"product"`):
            Whose rows the norm is taken of. `"product"`: the output rows of `dW = B A` (one coefficient per output
            row, applied to `B`'s row and, through the output gradient, to `A`). `"factors"`: every row of `A` and
            of `B` gets its own coefficient `1 / sqrt(||row||^2 + 1/eta^2)` from its own norm (the abstract's
            "per-parameter" reading).
        r (`int`, defaults to `8`):
            The rank, an integer >= 1.
        lora_alpha (`int`, *optional*):
            Must be left unset (or equal to `r`): ALLoRA is scaling-free. It is stored as `r`, so `alpha / r = 1`.
        lora_dropout (`float`, defaults to `0.0`):
            Must be 0: ALLoRA is dropout-free.
    """

    eta: float = field(
        default=2.0,
        metadata={
            "help": "Row coefficient at dW = 0 (initial step multiplier), a finite number > 0. The paper searched "
            "eta^2 in {1, 2, 4}."
        },
    )
    norm_squared: bool = field(
        default=True, metadata={"help": "Use ||dW_i||^2 (default) or the unsquared ||dW_i|| in the row coefficient."}
    )
    coefficient_on: Literal["gradient", "update"] = field(
        default="gradient",
        metadata={
            "help": "'gradient': scale the gradients of A and B in backward (the paper). 'update': plain gradients, "
            "the optimizer (built by regtune's trainers or regtune.create_allora_optimizer) scales the update."
        },
    )
    row_norm: Literal["product", "factors"] = field(
        default="product",
        metadata={
            "help": "'product': the coefficient of output row i comes from ||(B A)_i|| (default). 'factors': every "
            "row of A and of B gets a coefficient from its own norm."
        },
    )
    lora_alpha: int | None = field(
        default=None, metadata={"help": "Must be unset or equal to r: ALLoRA has no alpha/r scaling."}
    )

    def field_errors(self) -> list[str]:
        """Every problem of this config, one string per bad field naming it and its allowed values."""
        errors = []
        if not (_is_int(self.r) and self.r >= 1):
            errors.append(f"`r` = {self.r!r} (allowed: an integer >= 1)")
        if not (_is_real(self.eta) and self.eta > 0):
            errors.append(f"`eta` = {self.eta!r} (allowed: a finite number > 0)")
        if not isinstance(self.norm_squared, bool):
            errors.append(f"`norm_squared` = {self.norm_squared!r} (allowed: True or False)")
        if self.coefficient_on not in ALLORA_COEFFICIENT_TARGETS:
            errors.append(f"`coefficient_on` = {self.coefficient_on!r} (allowed: 'gradient' or 'update')")
        if self.row_norm not in ALLORA_ROW_NORMS:
            errors.append(f"`row_norm` = {self.row_norm!r} (allowed: 'product' or 'factors')")
        if self.lora_alpha is not None and not (
            _is_real(self.lora_alpha) and _is_int(self.r) and self.lora_alpha == self.r
        ):
            errors.append(
                f"`lora_alpha` = {self.lora_alpha!r} (allowed: unset or equal to r={self.r!r}; ALLoRA is "
                "scaling-free: its row coefficient, set by `eta`, replaces the alpha/r factor)"
            )
        if not (_is_real(self.lora_dropout) and self.lora_dropout == 0):
            errors.append(
                f"`lora_dropout` = {self.lora_dropout!r} (allowed: 0.0; ALLoRA is dropout-free: the paper shows "
                "dropout is an unreliable regularizer on short schedules and slows the escape of B from 0)"
            )
        for name, reason in (
            ("use_rslora", "rsLoRA is a scaling rule and ALLoRA has none"),
            ("lora_bias", "ALLoRA's row coefficient covers B A only, not a bias of B"),
            ("fan_in_fan_out", None),
        ):
            value = getattr(self, name)
            if not isinstance(value, bool) or (reason is not None and value):
                allowed = "False" + (f"; {reason}" if reason else " or True")
                errors.append(f"`{name}` = {value!r} (allowed: {allowed})")
        for name in ("alpha_pattern", "rank_pattern"):
            if getattr(self, name):
                errors.append(
                    f"`{name}` = {getattr(self, name)!r} (allowed: empty; ALLoRA uses one rank `r` and no alpha)"
                )
        variants = [
            f.name
            for f in dataclasses.fields(self)
            if f.metadata.get("is_lora_variant") and getattr(self, f.name) not in (None, False)
        ]
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() == "mica":
            variants.append("init_lora_weights='mica'")
        for name in variants:
            errors.append(
                f"`{name.split('=')[0]}` = {getattr(self, name, 'mica')!r} (allowed: False / None; ALLoRA is itself "
                "a LoRA variant and peft applies one variant per adapter: DoRA, aLoRA, VeLoRA, MiCA, KaSA, "
                "MonteCLoRA, BD-LoRA and Arrow change LoRA's forward or merge, for which the paper defines no row "
                "coefficient)"
            )
        for name in ("target_modules", "modules_to_save", "exclude_modules", "target_parameters"):
            if not _is_module_names(getattr(self, name)):
                errors.append(
                    f"`{name}` = {getattr(self, name)!r} (allowed: None, a name or regex string, or a list of names)"
                )
        if self.bias not in _BIAS_VALUES:
            errors.append(f"`bias` = {self.bias!r} (allowed: 'none', 'all' or 'lora_only')")
        return errors

    def __post_init__(self):
        errors = self.field_errors()
        if errors:
            count = f"{len(errors)} invalid arguments" if len(errors) > 1 else "invalid argument"
            raise ValueError(f"ALLoRAConfig: {count}: " + "; ".join(errors) + ".")
        self.lora_alpha = self.r
        self.eta = float(self.eta)
        super().__post_init__()
        self.peft_type = PeftType.ALLORA
