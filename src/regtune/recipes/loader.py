"""Reading recipe files and applying dotted command-line overrides (`--training.learning_rate=1e-3`)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

from .schema import Recipe, validate_recipe
from .validation import RecipeError, load_yaml, suggest


def parse_override_args(args: Iterable[str]) -> list[tuple[str, Any]]:
    """
    Parse `["--a.b=1", "--c", "x"]` into `[("a.b", 1), ("c", "x")]`. Values are read as YAML scalars / flow
    collections (`1e-3` -> float, `true` -> bool, `null` -> None, `[q, v]` -> list); `--flag` alone means `true`.
    """
    args = list(args)
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError([("", f"expected an override --key.path=value, got {arg!r}")])
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                text = args[i + 1]
                i += 1
            else:
                text = "true"
        try:
            value = load_yaml(text) if text != "" else ""
        except Exception as e:
            raise RecipeError([(key, f"cannot parse the override value {text!r}: {e}")]) from None
        out.append((key, value))
        i += 1
    return out


def parse_set_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """
    Parse study-style `--set` values, `["budget.tokens=65536", "training.learning_rate=1e-2"]` ->
    `{"budget.tokens": 65536, ...}`, for [`apply_overrides`]. The values are YAML, read like recipes (`1e-2` is a
    float, `no` a string).
    """
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"An override must look like key.path=value, got {item!r}.")
        overrides[key.strip()] = load_yaml(value)
    return overrides


def apply_overrides(raw: dict, overrides: dict | Iterable[tuple[str, Any]]) -> dict:
    """
    Return a copy of recipe data `raw` with dotted overrides applied.

    A key path walks mappings by key and lists by index; in `runs` a run can also be named:
    `runs.allora.adapter.eta` sets `eta` in the run named `allora`. Missing mappings on the way are created, so
    `--training.warmup_ratio=0.1` works whether or not the recipe has a `training:` section. The result is
    validated as usual, so a misspelled key is reported with its path.
    """
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for dotted, value in items:
        parts = dotted.split(".")
        node: Any = raw
        walked = []
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, walked)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(
                    [(".".join(walked), f"cannot override {dotted!r}: {'.'.join(walked)} is not a mapping")]
                )
            walked.append(part)
    return raw


def _list_index(node: list, part: str, walked: list[str]) -> int:
    path = ".".join(walked)
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise RecipeError([(f"{path}.{part}", f"index out of range: {path} has {len(node)} items")])
    names = [item.get("name") for item in node if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(
        [
            (
                f"{path}.{part}",
                f"no item named {part!r} in {path}.{suggest(part, [n for n in names if n])} Names: {names}",
            )
        ]
    )


def load_recipe(path: str, overrides: dict | Iterable[tuple[str, Any]] | None = None) -> Recipe:
    """
    Read the recipe YAML at `path`, apply `overrides` (see [`apply_overrides`]) and validate it.

    The recipe's `name` defaults to the file name without extension; its `output_dir` (default `runs/<name>`) is
    relative to the working directory. Raises [`RecipeError`] (a `ValueError`) naming every invalid key path.
    """
    with open(path) as f:
        text = f.read()
    try:
        raw = load_yaml(text)
    except Exception as e:
        raise RecipeError([("", f"not valid YAML: {e}")], path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([("", f"a recipe is a YAML mapping, got {type(raw).__name__}")], path)
    try:
        raw = apply_overrides(raw, overrides or [])
    except RecipeError as e:
        raise RecipeError(e.errors, path) from None
    default_name = os.path.splitext(os.path.basename(path))[0]
    return validate_recipe(raw, source=path, default_name=default_name)
