"""The `token-budget` recipe kind (the multi-epoch study): YAML keys, defaults and validation.

```yaml
name: multi_epoch                    # defaults to the file name
description: ...
output_dir: runs/multi_epoch         # relative to the working directory; defaults to runs/<name>
seed: 0                              # or seeds: [0, 1, 2]: every run once per seed (paired seeds)
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
import inspect
import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .checks import SectionModel, check_mapping, check_model, construct_checked
from .errors import Errors, join_path, suggest, unknown_key


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


class DataSpec(SectionModel):
    """`data:` of the recipe (see the module docstring)."""

    text_file: str | None = None
    hub: dict[str, Any] | None = None
    tokenizer: str = Field("char", min_length=1)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    heldout_tokens: int | None = Field(65536, ge=1)
    block_size: int = Field(128, ge=2)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.text_file is None) == (self.hub is None):
            raise ValueError("give exactly one of `text_file` (a local text file) and `hub` (a datasets corpus)")
        if self.hub is not None and self.heldout_tokens is None:
            raise ValueError("`heldout_tokens` is required with `hub`: how many tokens after the pool to hold out")
        return self


class HubCorpus(SectionModel):
    """`data.hub:` a corpus read with `datasets.load_dataset`."""

    path: str = Field(description="the dataset id or builder (e.g. HuggingFaceFW/fineweb-edu, text)")
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True
    data_files: str | list[str] | dict[str, str | list[str]] | None = None


class BudgetSpec(SectionModel):
    """`budget:` training tokens of every run, and the repetition counts compared."""

    tokens: int = Field(ge=1)
    repetitions: list[int] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1)

    @field_validator("repetitions")
    @classmethod
    def _distinct(cls, repetitions):
        if len(set(repetitions)) != len(repetitions) or min(repetitions) < 1:
            raise ValueError(f"must be a list of distinct integers >= 1, got {repetitions!r}")
        return repetitions


class EvaluationSpec(SectionModel):
    """`evaluation:` held-out evaluations during training and the batch size."""

    points: int = Field(8, ge=0)
    curve_tokens: int | None = Field(16384, ge=1)
    batch_size: int = Field(64, ge=1)


class TopLevel(SectionModel):
    """The top-level keys of a token-budget recipe (the sections are checked by their own models)."""

    name: str | None = Field(None, min_length=1)
    description: str = ""
    output_dir: str | None = None
    seed: int = Field(0, ge=0)
    seeds: list[int] | None = Field(None, min_length=1)
    torch_num_threads: int | None = Field(None, ge=1)
    data: dict | None = None
    budget: dict | None = None
    models: dict | None = None
    hidden_dropout: Literal["auto"] | bool = "auto"
    dropout: dict | None = None
    training: dict | None = None
    evaluation: dict | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds):
        if seeds is not None and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
            raise ValueError(f"must be a list of distinct integers >= 0, got {seeds!r}")
        return seeds

    @model_validator(mode="after")
    def _seed_or_seeds(self):
        if self.seeds is not None and "seed" in self.model_fields_set:
            raise ValueError("give `seed` (one run per setting) or `seeds` (one run per setting and seed), not both")
        return self


@dataclass
class MultiEpochStudy:
    """A validated token-budget (multi-epoch) recipe."""

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
    seeds: list[int] | None = None
    torch_num_threads: int | None = None
    hidden_dropout: str | bool = "auto"
    eval_points: int = 8
    eval_curve_tokens: int | None = 16384
    eval_batch_size: int = 64
    source: str | None = None
    kind = "token-budget"

    @property
    def run_seeds(self) -> list[int]:
        """The seeds every setting is run with: `seeds`, or `[seed]`."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `study.json` holds)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        return copy.deepcopy({**out, "data": self.data.model_dump()})


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
            errors.add(
                f"{path}.model_type", f"unknown model type {model_type!r}.{suggest(model_type, CONFIG_MAPPING)}"
            )
            continue
        config_cls = CONFIG_MAPPING[model_type]
        if dataclasses.is_dataclass(config_cls):
            fields = check_mapping(fields, config_cls, path, errors)
        else:
            allowed = [p for p in inspect.signature(config_cls.__init__).parameters if p not in ("self", "kwargs")]
            for key in fields:
                if key not in allowed:
                    errors.add(join_path(path, key), unknown_key(key, allowed, config_cls.__name__))
        models[str(name)] = {"model_type": model_type, **fields}
    return models


def _validate_dropout(raw, errors: Errors) -> dict[str, dict]:
    if raw is None:
        return copy.deepcopy(DEFAULT_DROPOUT)
    if not isinstance(raw, dict) or not raw:
        errors.add("dropout", "expected a mapping of setting names to DropoutSchedule arguments, e.g. {none: {p: 0}}")
        return {}
    from regtune.regularizers.dropout_schedule import DropoutSchedule

    settings = {}
    for name, args in raw.items():
        path, before = f"dropout.{name}", len(errors.items)
        settings[str(name)] = args = check_mapping(args, DropoutSchedule, path, errors)
        if len(errors.items) > before:
            continue
        if "p" not in args:
            errors.add(f"{path}.p", "required: the dropout rate (or a mapping of dropout types to rates)")
        else:
            construct_checked(lambda a=args: DropoutSchedule(**copy.deepcopy(a)), path, {}, errors, "DropoutSchedule")
    return settings


def validate_recipe(raw: dict, source: str | None = None, default_name: str | None = None) -> MultiEpochStudy:
    """
    Validate a parsed token-budget recipe (overrides applied) and fill in the defaults.

    Raises:
        [`RecipeError`] (a `ValueError`): listing every invalid key path; unknown keys get close matches.
    """
    from transformers import TrainingArguments

    errors = Errors()
    top = check_model(raw, TopLevel, "", errors, "a token-budget recipe")
    name = top.name or default_name or "multi_epoch"
    data = check_model(top.data, DataSpec, "data", errors, "data")
    if isinstance(data.hub, dict):
        check_model(data.hub, HubCorpus, "data.hub", errors, "data.hub")
    budget = check_model(top.budget, BudgetSpec, "budget", errors, "budget")
    tokens, repetitions = getattr(budget, "tokens", None), sorted(getattr(budget, "repetitions", None) or [])
    if isinstance(tokens, int) and isinstance(data.block_size, int) and data.block_size > 0:
        short = [r for r in repetitions if tokens // (r * data.block_size) < 1]
        if short:
            errors.add("budget.repetitions", f"{short[0]} repetitions leave less than one block of unique tokens")
    evaluation = check_model(top.evaluation, EvaluationSpec, "evaluation", errors, "evaluation")
    training = check_mapping(top.training, TrainingArguments, "training", errors, forbidden=STUDY_TRAINING_KEYS)
    study = MultiEpochStudy(
        name=str(name),
        description=top.description or "",
        output_dir=str(top.output_dir or os.path.join("runs", str(name))),
        seed=top.seed,
        seeds=top.seeds,
        torch_num_threads=top.torch_num_threads,
        data=data,
        budget_tokens=tokens,
        repetitions=repetitions,
        models=_validate_models(top.models, errors),
        hidden_dropout=top.hidden_dropout,
        dropout=_validate_dropout(top.dropout, errors),
        training={**DEFAULT_TRAINING, **training},
        eval_points=evaluation.points,
        eval_curve_tokens=evaluation.curve_tokens,
        eval_batch_size=evaluation.batch_size,
        source=source,
    )
    errors.raise_if_any(source)
    return study


def load_study_recipe(source, overrides: dict[str, Any] | None = None) -> MultiEpochStudy:
    """
    Load and validate a token-budget recipe: a path (see [`~regtune.experiments.load_recipe`]) or a mapping.

    Args:
        source (`str`, `os.PathLike` or `dict`): a YAML file, or the recipe as a mapping.
        overrides (`dict[str, Any]` or list of `(key path, value)`, *optional*): applied before validation.
    """
    from .recipe import apply_overrides, load_recipe

    if isinstance(source, dict):
        return validate_recipe(apply_overrides(source, overrides or {}), None, "multi_epoch")
    study = load_recipe(str(source), overrides)
    if not isinstance(study, MultiEpochStudy):
        raise ValueError(f"{source} is a {study.kind!r} recipe, not a token-budget one")
    return study
