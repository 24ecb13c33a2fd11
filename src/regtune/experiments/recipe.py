"""Reading a recipe (a local file or folder, or a Hub repository), its overrides and its `kind`, and running it.

One override syntax for every kind: `--key.path=value` on the command line (`[("key.path", value)]` in Python).
A recipe's `kind` is `runs` (fine-tuning runs, the default), `token-budget` (training from scratch at a fixed token
budget: the multi-epoch study) or `gardo` (diffusion RL on the offline testbed); when a recipe names none, it is
told by its sections (`budget:` -> token-budget, `testbed:` / `methods:` -> gardo).
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from collections.abc import Iterable
from typing import Any

from .errors import RecipeError, join_path, suggest, unknown_choice
from .io import load_yaml


KINDS = {"runs": "finetune", "token-budget": "token_budget_recipe", "gardo": "gardo"}
KIND_ALIASES = {"multi-epoch": "token-budget"}
HUB_RECIPE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<path>.+))?$")


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


def parse_set_overrides(items: Iterable[str] | None) -> list[tuple[str, Any]]:
    """`--set key.path=value` (the `regtune study` alias) read as `--key.path=value`: [`parse_override_args`]."""
    return parse_override_args(f"--{item}" for item in items or [])


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
    hint = suggest(part, [n for n in names if n])
    raise RecipeError([(f"{path}.{part}", f"no item named {part!r} in {path}.{hint} Names: {names}")])


def resolve_source(source: str) -> str:
    """
    The local file of a recipe `source`: a YAML file, a folder holding `recipe.yaml` (what `regtune push`
    uploads), or a Hub repository `owner/name[:path/in/repo.yaml]`, downloaded with huggingface_hub (its cache, so
    it works offline once fetched). Raises `FileNotFoundError` naming what was tried.
    """
    if os.path.isdir(source):
        path = os.path.join(source, "recipe.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source} is a folder without recipe.yaml")
        return path
    match = HUB_RECIPE.match(source)
    if os.path.exists(source) or match is None or source.endswith((".yaml", ".yml")) and ":" not in source:
        return source
    from huggingface_hub import hf_hub_download

    filename = match.group("path") or "recipe.yaml"
    try:
        return hf_hub_download(match.group("repo"), filename)
    except Exception as e:  # not on the Hub, not in the cache (offline), no access
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"{source}: no such local file, and {filename} of the Hub repository {match.group('repo')} "
            f"could not be fetched ({first})"
        ) from None


def read_recipe(
    source: str | dict, overrides: dict | Iterable[tuple[str, Any]] | None = None
) -> tuple[str, dict, str]:
    """`(kind, raw data with the overrides applied, local path)` of the recipe `source` (see [`resolve_source`]; a
    mapping is a recipe held in Python, whose path is `"<recipe>"`)."""
    if isinstance(source, dict):
        raw, path, source = copy.deepcopy(source), "<recipe>", "<recipe>"
    else:
        path = resolve_source(source)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            raw = load_yaml(text)
        except Exception as e:
            raise RecipeError([("", f"not valid YAML: {e}")], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([("", f"a recipe is a YAML mapping, got {type(raw).__name__}")], source)
    try:
        raw = apply_overrides(raw, overrides or [])
    except RecipeError as e:
        raise RecipeError(e.errors, source) from None
    kind = raw.pop("kind", None)
    if kind is None:
        kind = "gardo" if {"testbed", "methods"} & set(raw) else "token-budget" if "budget" in raw else "runs"
    kind = KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if not isinstance(kind, str) or kind not in KINDS:
        raise RecipeError([("kind", unknown_choice("kind", kind, KINDS, shown=KINDS))], source)
    return kind, raw, path


def import_paths(raw: dict) -> list[tuple[str, str]]:
    """`(key path, import path)` of every trainer or regularizer a recipe names by import path (`trl.SFTTrainer`,
    `my_pkg.module:MyRegularizer`): the code loading it would import."""
    from regtune.regularizers import is_import_path

    found = []
    sections = [("", raw)] + [
        (join_path("runs", i), run) for i, run in enumerate(raw.get("runs") or []) if isinstance(run, dict)
    ]
    for prefix, section in sections:
        if is_import_path(section.get("trainer")):
            found.append((join_path(prefix, "trainer"), section["trainer"]))
        for j, item in enumerate(section.get("regularizers") or []):
            if isinstance(item, dict) and is_import_path(item.get("type")):
                found.append((join_path(join_path(join_path(prefix, "regularizers"), j), "type"), item["type"]))
    return found


def is_hub_source(source: str) -> bool:
    """Whether `source` names a Hub repository (`owner/name[:path]`) rather than a local file or folder."""
    return bool(HUB_RECIPE.match(source)) and not os.path.exists(source)


def load_recipe(
    source: str | dict, overrides: dict | Iterable[tuple[str, Any]] | None = None, trust_remote_code: bool = False
):
    """
    Read the recipe `source` (a file, a folder with recipe.yaml, a Hub repository `owner/name[:path]`, or a recipe
    held in Python as a mapping, which then needs its own `name`), apply
    `overrides` (see [`apply_overrides`]) and validate it as its `kind` says: a
    [`~regtune.experiments.finetune.Recipe`], a [`~regtune.experiments.token_budget_recipe.MultiEpochStudy`] or a
    [`~regtune.experiments.gardo.GARDOStudy`].

    The recipe's `name` defaults to the file name without extension; its `output_dir` (default `runs/<name>`) is
    relative to the working directory. Raises [`RecipeError`] (a `ValueError`) naming every invalid key path.

    A recipe from the Hub is someone else's text: like transformers' remote code, the trainers and regularizers it
    names by import path are imported only with `trust_remote_code=True` (`--trust-remote-code`); otherwise a
    [`RecipeError`] names them, before anything is imported.
    """
    kind, raw, path = read_recipe(source, overrides)
    if isinstance(source, dict):
        source = "<recipe>"
    if is_hub_source(source) and not trust_remote_code:
        paths = import_paths(raw)
        if paths:
            raise RecipeError(
                [
                    (key, f"{value!r} would be imported from a recipe downloaded from the Hub; read the recipe, then "
                     "pass --trust-remote-code (trust_remote_code=True) to allow it")
                    for key, value in paths
                ],
                source,
            )  # fmt: skip
    module = importlib.import_module(f".{KINDS[kind]}", __package__)
    default_name = "recipe" if path == "<recipe>" else os.path.splitext(os.path.basename(path))[0]
    if default_name == "recipe" and is_hub_source(source):
        default_name = source.split(":")[0].rsplit("/", 1)[-1]
    return module.validate_recipe(raw, source=source, default_name=default_name)
