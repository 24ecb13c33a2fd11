"""Dropout schedules and run-time dropout setting.

"To Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis" (Xue et al. 2023,
https://arxiv.org/abs/2305.13230) finds dropout the one regularizer that reliably reduces multi-epoch degradation,
and that it can be switched on late in training or ramped up. This module holds the schedule math
([`scheduled_dropout_rate`]) and the helper that applies a rate to a model at run time ([`set_dropout`]).

A model's dropout probabilities live in three places, and [`set_dropout`] can set all of them:

- `"modules"`: every `torch.nn.Dropout`-family module (`nn.Dropout`, `nn.Dropout1d/2d/3d`, `nn.AlphaDropout`, ...),
  through its `p`. This includes peft's `lora_dropout` modules. Modules that a model replaced by `nn.Identity` because
  their rate was 0 at construction (peft `lora_dropout=0`, GPT-2's `summary_first_dropout`) cannot be switched on.
- `"attributes"`: float attributes copied from the config at construction and read in `forward`, such as
  `LlamaAttention.attention_dropout` (`dropout=0.0 if not self.training else self.attention_dropout`).
- `"config"`: dropout fields of every `PretrainedConfig` reachable from the model's modules, for models that read
  `self.config.<field>` in `forward` (e.g. `config.dropout`, `config.attention_dropout`). Fields that are `None`
  (e.g. `classifier_dropout=None`, meaning "use hidden_dropout_prob") are left alone.

A name counts as a dropout probability when it contains `"dropout"` or ends in `"pdrop"` (GPT-2's `attn_pdrop`,
`resid_pdrop`, `embd_pdrop`) and its value is a number in [0, 1] (not a bool). Stochastic depth (`drop_path_rate`,
`DropPath.drop_prob`) and LayerDrop (`layerdrop`) are not dropout and are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


DROPOUT_SCHEDULE_MODES = ("constant", "linear", "step")
DROPOUT_KINDS = ("modules", "attributes", "config")


def scheduled_dropout_rate(
    step: int,
    p: float,
    mode: str = "constant",
    start_p: float = 0.0,
    start_step: int = 0,
    end_step: int | None = None,
) -> float:
    """
    Return the dropout probability at optimizer step `step` (0-based: the rate used while computing update `step+1`).

    - `"constant"`: `p` at every step.
    - `"step"`: `start_p` before `start_step`, `p` from `start_step` on ("dropout switched on at step k" when
      `start_p=0`).
    - `"linear"`: `start_p` up to `start_step`, then a linear ramp reaching `p` at `end_step`, and `p` afterwards:
      `start_p + (p - start_p) * (step - start_step) / (end_step - start_step)`.

    Args:
        step (`int`): the optimizer step (`TrainerState.global_step`), >= 0.
        p (`float`): the target rate, in [0, 1).
        mode (`str`, defaults to `"constant"`): one of `"constant"`, `"linear"`, `"step"`.
        start_p (`float`, defaults to `0.0`): the rate before the schedule starts (`"linear"`, `"step"`).
        start_step (`int`, defaults to `0`): where the ramp starts (`"linear"`) or the switch happens (`"step"`).
        end_step (`int`, *optional*): where the ramp reaches `p` (`"linear"` only; must be > `start_step`).

    Returns:
        `float`: the dropout probability.
    """
    if mode not in DROPOUT_SCHEDULE_MODES:
        raise ValueError(f"`mode` must be one of {list(DROPOUT_SCHEDULE_MODES)}, got {mode!r}.")
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if mode == "constant":
        return float(p)
    if mode == "step":
        return float(p) if step >= start_step else float(start_p)
    if end_step is None or end_step <= start_step:
        raise ValueError(
            f"`end_step` must be given and > `start_step` ({start_step}) for mode='linear', got {end_step}."
        )
    if step <= start_step:
        return float(start_p)
    if step >= end_step:
        return float(p)
    return float(start_p + (p - start_p) * (step - start_step) / (end_step - start_step))


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or name.endswith("pdrop")


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def dropout_sites(model: nn.Module, kinds: Iterable[str] = DROPOUT_KINDS) -> list[tuple[object, str]]:
    """
    Find every place a dropout probability of `model` lives, as `(object, attribute_name)` pairs.

    Compute this once and pass it to [`set_dropout`] as `sites=` when setting a rate at every step: it walks all
    modules, which costs more than setting a few attributes.

    Args:
        model (`torch.nn.Module`): any module (a transformers model, a peft model, a plain torch model).
        kinds (`Iterable[str]`, defaults to all): a subset of `("modules", "attributes", "config")`, see the module
            docstring.

    Returns:
        `list[tuple[object, str]]`: `(module, "p")` for dropout modules, `(module, name)` for float attributes and
        `(config, name)` for config fields. Each object/name pair appears once.
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in DROPOUT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be a non-empty subset of {list(DROPOUT_KINDS)}, got {list(kinds)}.")
    sites: list[tuple[object, str]] = []
    seen: set[tuple[int, str]] = set()

    def add(obj: object, name: str) -> None:
        key = (id(obj), name)
        if key not in seen:
            seen.add(key)
            sites.append((obj, name))

    for module in model.modules():
        if "modules" in kinds and isinstance(module, nn.modules.dropout._DropoutNd):
            add(module, "p")
        if "attributes" in kinds:
            for name, value in vars(module).items():
                if not name.startswith("_") and _is_dropout_name(name) and _is_rate(value):
                    add(module, name)
        if "config" in kinds:
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "to_dict") and not isinstance(config, dict):
                for name, value in vars(config).items():
                    if not name.startswith("_") and _is_dropout_name(name) and _is_rate(value):
                        add(config, name)
    return sites


def set_dropout(
    model: nn.Module | None,
    p: float,
    kinds: Iterable[str] = DROPOUT_KINDS,
    sites: list[tuple[object, str]] | None = None,
) -> int:
    """
    Set every dropout probability of `model` to `p` at run time (see the module docstring for what is covered).

    Example:

    ```py
    >>> from regtune.functional.dropout import set_dropout
    >>> n = set_dropout(model, 0.1)  # nn.Dropout modules, attention_dropout attributes, config fields
    >>> n = set_dropout(model, 0.0, kinds=("modules",))  # only nn.Dropout modules
    ```

    Args:
        model (`torch.nn.Module`, *optional*): the model; ignored when `sites` is given.
        p (`float`): the dropout probability, in [0, 1].
        kinds (`Iterable[str]`, defaults to all): a subset of `("modules", "attributes", "config")`.
        sites (`list[tuple[object, str]]`, *optional*): precomputed [`dropout_sites`], to skip the module walk.

    Returns:
        `int`: the number of places set (0 means the model has no dropout that can be set: warn the user).
    """
    if not _is_rate(p):
        raise ValueError(f"`p` must be a number in [0, 1], got {p!r}.")
    if sites is None:
        if model is None:
            raise ValueError("`set_dropout` needs `model` or `sites`.")
        sites = dropout_sites(model, kinds)
    for obj, name in sites:
        setattr(obj, name, float(p))
    return len(sites)


def get_dropout_values(sites: list[tuple[object, str]]) -> list[float]:
    """Return the current value at each of `sites` (e.g. to restore them later with [`restore_dropout`])."""
    return [getattr(obj, name) for obj, name in sites]


def restore_dropout(sites: list[tuple[object, str]], values: list[float]) -> None:
    """Put back the `values` recorded by [`get_dropout_values`] at `sites`."""
    for (obj, name), value in zip(sites, values):
        setattr(obj, name, value)
