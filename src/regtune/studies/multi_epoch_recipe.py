"""The recipe of a multi-epoch study: YAML keys, defaults and validation (errors name the key path).

```yaml
name: multi_epoch                    # defaults to the file name
description: ...
output_dir: runs/multi_epoch         # relative to the working directory; defaults to runs/<name>
seed: 0
torch_num_threads: 1                 # null: torch's default
data:
  text_file: ../shared/data/text/input.txt   # a local UTF-8 text file; its last `heldout_fraction` is held out
  hub: null                          # or a corpus: {path, name, split, text_column, streaming, data_files}
  tokenizer: char                    # char | byte | a tokenizer name or directory (AutoTokenizer)
  heldout_fraction: 0.1              # text_file only
  heldout_tokens: 65536              # held-out tokens evaluated at the end (hub: the tokens after the training pool)
  block_size: 128                    # tokens per training sequence
budget:
  tokens: 1048576                    # training tokens of every run
  repetitions: [1, 4, 16, 64]        # epochs over budget/repetitions unique tokens
models:                              # one or more model sizes: config fields (model_type defaults to llama)
  small: {hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 256}
hidden_dropout: auto                 # add residual/embedding dropout to models that have none (Llama): auto|true|false
dropout:                             # dropout settings: regtune DropoutSchedule arguments
  none: {p: 0.0}
  constant: {p: 0.1}
training: {...}                      # transformers.TrainingArguments fields, the same for every run
evaluation: {points: 8, curve_tokens: 16384, batch_size: 64}
```
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import typing
from dataclasses import dataclass
from typing import Any

from regtune.recipes.loader import apply_overrides, parse_set_overrides
from regtune.recipes.validation import Errors, check_mapping, check_value, load_yaml


TOP_KEYS = (
    "name",
    "description",
    "output_dir",
    "seed",
    "torch_num_threads",
    "data",
    "budget",
    "models",
    "hidden_dropout",
    "dropout",
    "training",
    "evaluation",
)
DATA_KEYS = ("text_file", "hub", "tokenizer", "heldout_fraction", "heldout_tokens", "block_size")
HUB_KEYS = ("path", "name", "split", "text_column", "streaming", "data_files")
BUDGET_KEYS = ("tokens", "repetitions")
EVALUATION_KEYS = ("points", "curve_tokens", "batch_size")

STUDY_TRAINING_KEYS = {
    "output_dir": "the study writes each run to <output_dir>/runs/<run>",
    "num_train_epochs": "set by the study from `budget.repetitions`",
    "max_steps": "set by the study from `budget.tokens`",
    "eval_strategy": "set by the study (`evaluation.points`)",
    "eval_steps": "set by the study (`evaluation.points`)",
    "do_eval": "set by the study",
    "eval_on_start": "set by the study",
    "per_device_eval_batch_size": "use `evaluation.batch_size`",
    "seed": "use the top-level `seed`",
    "data_seed": "use the top-level `seed`",
}
"""TrainingArguments fields that the study sets itself, with the reason (a recipe may not set them)."""

DEFAULT_TRAINING = {
    "per_device_train_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "adam_beta2": 0.99,
    "max_grad_norm": 1.0,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}

DEFAULT_DROPOUT = {
    "none": {"p": 0.0},
    "constant": {"p": 0.1},
    "late": {"p": 0.1, "mode": "step", "start_fraction": 0.5},
    "ramp": {"p": 0.1, "mode": "linear", "end_fraction": 1.0},
}


class StudyRecipeError(ValueError):
    """An invalid study recipe; `errors` lists `(key_path, message)` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.errors = errors
        lines = "\n".join(f"  {path}: {message}" for path, message in errors)
        super().__init__(f"Invalid multi-epoch study recipe {source}:\n{lines}")


@dataclass
class DataSpec:
    """`data:` of the recipe (see the module docstring)."""

    text_file: str | None = None
    hub: dict | None = None
    tokenizer: str = "char"
    heldout_fraction: float = 0.1
    heldout_tokens: int | None = 65536
    block_size: int = 128


@dataclass
class MultiEpochStudy:
    """A validated multi-epoch study recipe."""

    name: str
    output_dir: str
    data: DataSpec
    budget_tokens: int
    repetitions: list[int]
    models: dict[str, dict]
    dropout: dict[str, dict]
    training: dict
    description: str = ""
    seed: int = 0
    torch_num_threads: int | None = None
    hidden_dropout: str | bool = "auto"
    eval_points: int = 8
    eval_curve_tokens: int | None = 16384
    eval_batch_size: int = 64

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `study.json` holds)."""
        return dataclasses.asdict(self)


def _allowed(keys) -> str:
    return "allowed keys: " + ", ".join(keys)


def _check_keys(mapping, allowed, path: str, errors: Errors) -> dict:
    """Check that `mapping` is a mapping whose keys are all in `allowed`; return it (or `{}`)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        errors.add(path or "<top>", f"expected a mapping, got {mapping!r}")
        return {}
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.add(f"{path}.{key}" if path else str(key), f"unknown key{hint}; {_allowed(allowed)}")
    return mapping


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value, path: str, errors: Errors, minimum: int = 1, optional: bool = False):
    if value is None and optional:
        return None
    if not _is_int(value) or value < minimum:
        errors.add(path, f"must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")
    return value


def _validate_data(raw, errors: Errors) -> DataSpec:
    raw = _check_keys(raw, DATA_KEYS, "data", errors)
    spec = DataSpec(**{key: value for key, value in raw.items() if key in DATA_KEYS})
    if (spec.text_file is None) == (spec.hub is None):
        errors.add("data", "give exactly one of `text_file` (a local text file) and `hub` (a datasets corpus)")
    if spec.text_file is not None and not isinstance(spec.text_file, str):
        errors.add("data.text_file", f"must be a path, got {spec.text_file!r}")
    if spec.hub is not None:
        hub = _check_keys(spec.hub, HUB_KEYS, "data.hub", errors)
        if hub and not isinstance(hub.get("path"), str):
            errors.add("data.hub.path", "required: the dataset id or builder (e.g. HuggingFaceFW/fineweb-edu, text)")
        if spec.heldout_tokens is None:
            errors.add(
                "data.heldout_tokens", "required with `hub`: how many tokens after the training pool to hold out"
            )
    if not isinstance(spec.tokenizer, str) or not spec.tokenizer:
        errors.add("data.tokenizer", f"must be 'char', 'byte' or a tokenizer name/directory, got {spec.tokenizer!r}")
    fraction = spec.heldout_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        errors.add("data.heldout_fraction", f"must be a number in (0, 1), got {fraction!r}")
    _int(spec.heldout_tokens, "data.heldout_tokens", errors, minimum=1, optional=True)
    _int(spec.block_size, "data.block_size", errors, minimum=2)
    return spec


def _validate_models(raw, errors: Errors) -> dict[str, dict]:
    if not isinstance(raw, dict) or not raw:
        errors.add("models", "required: a mapping of model names to config fields, e.g. {small: {hidden_size: 64}}")
        return {}
    from transformers import CONFIG_MAPPING

    models = {}
    for name, fields in raw.items():
        path = f"models.{name}"
        if not isinstance(fields, dict):
            errors.add(path, f"expected a mapping of config fields, got {fields!r}")
            continue
        fields = dict(fields)
        model_type = fields.pop("model_type", "llama")
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            errors.add(f"{path}.model_type", f"unknown model type {model_type!r}; close: {close}")
            continue
        config_cls = CONFIG_MAPPING[model_type]
        if dataclasses.is_dataclass(config_cls):
            fields = check_mapping(fields, config_cls, path, errors, what=config_cls.__name__)
        else:
            allowed = [p for p in inspect.signature(config_cls.__init__).parameters if p not in ("self", "kwargs")]
            _check_keys(fields, allowed, path, errors)
        models[str(name)] = {"model_type": model_type, **fields}
    return models


def _validate_dropout(raw, errors: Errors) -> dict[str, dict]:
    if raw is None:
        return copy.deepcopy(DEFAULT_DROPOUT)
    if not isinstance(raw, dict) or not raw:
        errors.add("dropout", "expected a mapping of setting names to DropoutSchedule arguments, e.g. {none: {p: 0}}")
        return {}
    from regtune.regularizers.dropout_schedule import DropoutSchedule

    allowed = [p for p in inspect.signature(DropoutSchedule.__init__).parameters if p != "self"]
    hints = typing.get_type_hints(DropoutSchedule.__init__)
    settings = {}
    for name, args in raw.items():
        path = f"dropout.{name}"
        if not isinstance(args, dict):
            errors.add(path, f"expected DropoutSchedule arguments, e.g. {{p: 0.1, mode: linear, end_fraction: 1}}, "
                       f"got {args!r}")  # fmt: skip
            continue
        before = len(errors.items)
        _check_keys(args, allowed, path, errors)
        for key, value in args.items():
            if key in hints:
                check_value(value, hints[key], f"{path}.{key}", errors)
        if "p" not in args:
            errors.add(f"{path}.p", "required: the dropout rate (or a mapping of dropout types to rates)")
        if len(errors.items) == before:
            try:
                DropoutSchedule(**copy.deepcopy(args))
            except ValueError as err:
                errors.add(path, str(err).removeprefix("DropoutSchedule: "))
        settings[str(name)] = dict(args)
    return settings


def _validate_training(raw, errors: Errors) -> dict:
    from transformers import TrainingArguments

    checked = check_mapping(
        raw or {}, TrainingArguments, "training", errors, forbidden=STUDY_TRAINING_KEYS, what="TrainingArguments"
    )
    return {**DEFAULT_TRAINING, **checked}


def validate_study(raw: dict, source: str = "<dict>") -> MultiEpochStudy:
    """
    Validate a parsed study recipe and fill in the defaults.

    Raises:
        [`StudyRecipeError`] (a `ValueError`): listing every invalid key path; unknown keys name the allowed ones.
    """
    errors = Errors()
    raw = _check_keys(raw, TOP_KEYS, "", errors)
    if not raw and not errors.items:
        errors.add("<top>", "the recipe is empty")
    default_name = os.path.splitext(os.path.basename(source))[0] if source != "<dict>" else "multi_epoch"
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        errors.add("name", f"must be a non-empty string, got {name!r}")
    output_dir = raw.get("output_dir") or os.path.join("runs", str(name))
    data = _validate_data(raw.get("data"), errors)
    budget = _check_keys(raw.get("budget"), BUDGET_KEYS, "budget", errors)
    tokens = _int(budget.get("tokens"), "budget.tokens", errors)
    repetitions = budget.get("repetitions", [1, 4, 16, 64])
    if (
        not isinstance(repetitions, list)
        or not repetitions
        or not all(_is_int(r) and r >= 1 for r in repetitions)
        or len(set(repetitions)) != len(repetitions)
    ):
        errors.add("budget.repetitions", f"must be a list of distinct integers >= 1, got {repetitions!r}")
    elif _is_int(tokens) and _is_int(data.block_size):
        for r in repetitions:
            if tokens // (r * data.block_size) < 1:
                errors.add("budget.repetitions", f"{r} repetitions leave less than one block of unique tokens")
                break
    hidden_dropout = raw.get("hidden_dropout", "auto")
    if hidden_dropout not in ("auto", True, False):
        errors.add("hidden_dropout", f"must be auto, true or false, got {hidden_dropout!r}")
    evaluation = _check_keys(raw.get("evaluation"), EVALUATION_KEYS, "evaluation", errors)
    seed = raw.get("seed", 0)
    _int(seed, "seed", errors, minimum=0)
    threads = raw.get("torch_num_threads")
    _int(threads, "torch_num_threads", errors, minimum=1, optional=True)
    study = MultiEpochStudy(
        name=str(name),
        description=str(raw.get("description") or ""),
        output_dir=str(output_dir),
        seed=seed,
        torch_num_threads=threads,
        data=data,
        budget_tokens=tokens,
        repetitions=sorted(repetitions) if isinstance(repetitions, list) else [],
        models=_validate_models(raw.get("models"), errors),
        hidden_dropout=hidden_dropout,
        dropout=_validate_dropout(raw.get("dropout"), errors),
        training=_validate_training(raw.get("training"), errors),
        eval_points=_int(evaluation.get("points", 8), "evaluation.points", errors, minimum=0),
        eval_curve_tokens=_int(
            evaluation.get("curve_tokens", 16384), "evaluation.curve_tokens", errors, minimum=1, optional=True
        ),
        eval_batch_size=_int(evaluation.get("batch_size", 64), "evaluation.batch_size", errors),
    )
    if errors.items:
        raise StudyRecipeError(source, errors.items)
    return study


parse_overrides = parse_set_overrides  # the `--set` parser of `regtune study multi-epoch`


def load_study_recipe(source, overrides: dict[str, Any] | None = None) -> MultiEpochStudy:
    """
    Load and validate a study recipe. YAML is read like regtune recipes (YAML 1.2 scalars: `1e-3` is a float, only
    `true`/`false` are booleans).

    Args:
        source (`str`, `os.PathLike` or `dict`): a YAML file, or the recipe as a mapping.
        overrides (`dict[str, Any]`, *optional*): `{"key.path": value}` applied before validation.
    """
    if isinstance(source, dict):
        raw, label = copy.deepcopy(source), "<dict>"
    else:
        label = str(source)
        with open(source, encoding="utf-8") as f:
            text = f.read()
        try:
            raw = load_yaml(text) or {}
        except Exception as err:  # a YAML syntax error
            raise StudyRecipeError(label, [("<yaml>", str(err))]) from err
    if not isinstance(raw, dict):
        raise StudyRecipeError(label, [("<top>", f"expected a mapping, got {type(raw).__name__}")])
    return validate_study(apply_overrides(raw, overrides or {}), label)
