"""The recipe schema: what a recipe YAML may contain, and its validation into [`Recipe`] / [`RunSpec`].

A recipe is one YAML file:

```yaml
name: quickstart
seed: 42
model: {name_or_path: builtin:all-MiniLM-L6-v2}      # a Hub id, a local directory, builtin:<name>, or {config: {...}}
data: {builtin: quickstart-sentiment, options: {n_train: 64}}   # or {path: <Hub id | csv | json | dir>, ...}
adapter: {type: LORA, r: 8, target_modules: [query, value]}      # any peft / regtune config, by peft type name
regularizers: []                                   # [{type: <name in regtune.regularizers.REGULARIZERS> or my_pkg.module:MyRegularizer, ...}]
training: {learning_rate: 1e-3, num_train_epochs: 5}             # fields of the trainer's config (TrainingArguments)
evaluation: {splits: [in_distribution, held_out], metrics: [accuracy]}
runs:                                              # variants, each overriding sections of the above
  - {name: lora}
  - {name: allora, adapter: {type: ALLORA, r: 8, eta: 2.0, target_modules: [query, value]}}
```

Everything is checked before any model or data is loaded; every problem is reported with its key path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import itertools
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from regtune.data.models import BUILTIN_MODELS

from .checks import SectionModel, check_mapping, check_model, check_value, construct_checked
from .errors import Errors, RecipeError, join_path, suggest, unknown_choice, unknown_key


TASKS = ("sequence-classification", "causal-lm")
BUILTIN_METRICS = ("accuracy", "macro_f1")  # computed by regtune (offline); other names go to the evaluate library
LOWER_IS_BETTER = ("loss", "perplexity")
DEFAULT_TRAINERS = ("RegTrainer", "Trainer", "transformers.Trainer")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SECTION_KEYS = ("model", "data", "adapter", "regularizers", "training", "evaluation")
RUN_ONLY_KEYS = ("sweep", "select")  # a run's sweep, and how its value is chosen (not inherited from the top level)
RUN_KEYS = ("name", "description", "seed", "trainer") + SECTION_KEYS + RUN_ONLY_KEYS
TOP_LEVEL_KEYS = ("name", "description", "seed", "seeds", "select", "compare", "output_dir", "trainer", "runs")
TOP_LEVEL_KEYS += SECTION_KEYS
# peft config fields that the recipe sets elsewhere.
ADAPTER_FORBIDDEN = {
    "peft_type": "set the adapter type with `type`, e.g. `type: LORA`",
    "base_model_name_or_path": "set by peft from `model.name_or_path`",
    "inference_mode": "recipes train the adapter; load it with PeftModel.from_pretrained(..., is_trainable=False) for inference",
}
TRAINING_FORBIDDEN = {
    "output_dir": "the runner sets it to <output_dir>/<run name>/checkpoints; set the top-level `output_dir` instead",
    "push_to_hub": "use `regtune run RECIPE --push_to_hub REPO_ID` (or `regtune push RUN_DIR REPO_ID`), which uploads the "
    "adapter with a model card",
}
# Bounds that peft's configs do not check.
ADAPTER_RANGES = {"r": {"ge": 1}, "lora_dropout": {"ge": 0.0, "lt": 1.0}}
# Bounds that TrainingArguments itself does not check.
TRAINING_RANGES = {
    "learning_rate": {"ge": 0.0},
    "weight_decay": {"ge": 0.0},
    "num_train_epochs": {"gt": 0.0},
    "per_device_train_batch_size": {"ge": 1},
    "per_device_eval_batch_size": {"ge": 1},
    "gradient_accumulation_steps": {"ge": 1},
    "warmup_steps": {"ge": 0},
    "max_grad_norm": {"ge": 0.0},
    "adam_beta1": {"ge": 0.0, "lt": 1.0},
    "adam_beta2": {"ge": 0.0, "lt": 1.0},
    "adam_epsilon": {"ge": 0.0},
    "label_smoothing_factor": {"ge": 0.0, "le": 1.0},
    "seed": {"ge": 0},
}


# --------------------------------------------------------------------------------------------------------------------
# Sections (plain dataclasses; their annotations and metadata drive the validation)


class ModelSpec(SectionModel):
    """The `model:` section."""

    name_or_path: str | None = Field(
        None, description="A Hub id, a local directory (anything `from_pretrained` takes), or `builtin:<name>`."
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Instead of `name_or_path`: build a randomly initialized model from this config "
        "(`model_type` plus config fields, e.g. `{model_type: bert, hidden_size: 16}`); needs `tokenizer`.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer to load (Hub id, local dir, builtin:<name>); defaults to the model's."
    )
    task: Literal["sequence-classification", "causal-lm"] | None = Field(
        None,
        description="The head to load (AutoModelForSequenceClassification / AutoModelForCausalLM); defaults to the "
        "built-in data task's, else sequence-classification.",
    )
    revision: str | None = Field(None, description="Hub revision of the model and tokenizer.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="Dtype to load the weights in (`dtype` of from_pretrained)."
    )
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra from_pretrained keyword arguments.")
    head: Literal["class-descriptions"] | None = Field(
        None,
        description="`class-descriptions`: no new head; the encoder (`AutoModel`) classifies by the cosine similarity "
        "of a text to each class's description (regtune.data.dual_encoder.DualEncoderClassifier). Default: the "
        "task's head (AutoModelForSequenceClassification / AutoModelForCausalLM).",
    )
    prototypes: Literal["encoder", "frozen"] = Field(
        "encoder",
        description="With `head: class-descriptions`: class embeddings through the adapted encoder at every step "
        "(`encoder`, with gradient) or computed once by the pretrained encoder without gradient (`frozen`).",
    )
    logit_scale: float = Field(20.0, gt=0, description="With `head: class-descriptions`: logits = scale * cosine.")
    class_descriptions: dict[str, str] | None = Field(
        None,
        description="With `head: class-descriptions`: {label name: description}; default: the built-in task's "
        "descriptions, else the label names.",
    )


class DataSpec(SectionModel):
    """The `data:` section: a built-in task, or anything `datasets.load_dataset` reads."""

    builtin: str | None = Field(None, description="A built-in task (regtune.data.BUILTIN_TASKS).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the built-in task.")
    path: str | None = Field(None, description="`datasets.load_dataset` path: a Hub id, csv / json / parquet, a dir.")
    name: str | None = Field(None, description="`datasets.load_dataset` configuration name.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="`datasets.load_dataset` data_files (local files)."
    )
    revision: str | None = Field(None, description="Hub revision of the data set.")
    text_column: str | None = Field(None, description="Input text column (default: text).")
    text_pair_column: str | None = Field(None, description="Second text column for pair tasks.")
    label_column: str | None = Field(None, description="Label column (default: label).")
    train_split: str | None = Field(None, description="Split to train on (default: train).")
    max_length: int = Field(128, ge=1, description="Truncate inputs to this many tokens.")
    max_train_samples: int | None = Field(None, ge=1, description="Keep the first N training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Keep the first N rows of each eval split.")


class MetricSpec(SectionModel):
    """An item of `evaluation.metrics` with arguments: `{name: f1, args: {average: macro}}`."""

    name: str = Field(description="A built-in metric, an `evaluate` metric name, or a local metric folder.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the `evaluate` metric's `compute` (none for built-ins).",
    )


class EvaluationSpec(SectionModel):
    """The `evaluation:` section."""

    splits: list[str] | dict[str, str] | None = Field(
        None,
        description="Splits to evaluate on: a list, or {display name: split}. Defaults to the built-in task's "
        "evaluation splits, else validation (or test).",
    )
    metrics: list[str | dict[str, Any]] | None = Field(
        None,
        description="Classification metrics: the built-in `accuracy` and `macro_f1` (computed offline), or any metric "
        "of the `evaluate` library by name or local folder, optionally `{name: ..., args: {...}}` (the loss is "
        "always reported; causal-lm reports loss and perplexity only). Default: [accuracy].",
    )


@dataclass
class AdapterSpec:
    """A resolved `adapter:` section: peft type name, the config class, and its keyword arguments."""

    type: str
    kwargs: dict[str, Any]
    config_cls: Any = field(repr=False, compare=False)

    def build_config(self):
        return self.config_cls(**copy.deepcopy(self.kwargs))

    def to_dict(self) -> dict:
        return {"type": self.type, **self.kwargs}


@dataclass
class RegularizerSpec:
    """A resolved item of `regularizers:`."""

    type: str
    kwargs: dict[str, Any]

    def to_dict(self) -> dict:
        return {"type": self.type, **self.kwargs}


@dataclass
class RunSpec:
    """One fully resolved run of a recipe: the base sections with the run's overrides applied, validated."""

    name: str
    description: str | None
    seed: int
    trainer: str
    task: str
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec | None
    regularizers: list[RegularizerSpec]
    training: dict[str, Any]
    evaluation: EvaluationSpec
    sweep: dict[str, list] = field(default_factory=dict)  # dotted key path -> values (chosen on validation)
    variants: list[tuple[dict, RunSpec]] = field(default_factory=list, repr=False)  # one per sweep combination
    match: str | None = None  # choose the variant whose validation metric is closest to this run's choice
    values_from: str | None = None  # take this run's chosen values of its swept keys

    @property
    def method(self) -> str:
        """
        A short label of the method: the adapter type (or `full` fine-tuning), the trainer when it is not the
        default one (`ALLORA / LfUTrainer`, `ALLORA / SFTTrainer`), and the regularizers (`LORA + lfu`).
        """
        label = self.adapter.type if self.adapter is not None else "full"
        if self.trainer not in DEFAULT_TRAINERS:
            label += " / " + self.trainer.rpartition(".")[2]
        if self.regularizers:
            label += " + " + " + ".join(r.type for r in self.regularizers)
        return label

    def to_dict(self) -> dict:
        """A standalone recipe (no `runs:`) that validates back to this run."""

        def section(spec):
            return {k: v for k, v in spec.model_dump().items() if v is not None and v != {}}

        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(seed=self.seed, trainer=self.trainer)
        out["model"] = section(self.model)
        if self.model.head is None:  # the head's knobs (defaults) mean nothing without it
            out["model"] = {k: v for k, v in out["model"].items() if k not in ("prototypes", "logit_scale")}
        out["data"] = section(self.data)
        out["adapter"] = self.adapter.to_dict() if self.adapter is not None else None
        out["regularizers"] = [r.to_dict() for r in self.regularizers]
        out["training"] = copy.deepcopy(self.training)
        out["evaluation"] = section(self.evaluation)
        return out


class SelectSpec(SectionModel):
    """The top-level `select:` section: how a run's `sweep` value is chosen, before the test seeds run."""

    split: str = Field("validation", description="The split the sweep values are scored on (never a test split).")
    metric: str = Field(
        "accuracy",
        description="The metric the sweep values are chosen by: loss, perplexity, accuracy, macro_f1, or a result "
        "key of a metric in `evaluation.metrics` (e.g. f1).",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Maximize or minimize `metric`. Default: min for loss and perplexity, else max."
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [100],
        min_length=1,
        description="Seeds each sweep value is trained with (apart from the test `seeds`); scores are their means.",
    )

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = "min" if self.metric in LOWER_IS_BETTER else "max"
        return self


class RunSelectSpec(SectionModel):
    """A run's `select:`: choose its value by another run's choice instead of by its best validation score."""

    match: str | None = Field(
        None, description="The run whose chosen validation score this run's value should come closest to."
    )
    values_from: str | None = Field(None, description="Use the values this run chose for its own swept keys.")


class CompareSpec(SectionModel):
    """The top-level `compare:` section (or one item of a list of them): paired differences run - baseline."""

    baseline: str | list[str] = Field(description="The baseline run(s); every other run is compared with each.")
    runs: list[str] | None = Field(None, description="The runs compared with the baselines (default: all others).")
    metrics: list[str] = Field(
        min_length=1, description="`split.metric` names, e.g. test_novel.accuracy (H.accuracy for base-to-novel)."
    )


@dataclass
class Recipe:
    """A validated recipe: its runs, where they write, and the raw data (after overrides) it came from."""

    name: str
    description: str | None
    output_dir: str
    runs: list[RunSpec]
    raw: dict
    source: str | None = None
    seeds: list[int] | None = None  # every run once per seed (paired: same shots, initialization, data order)
    selection: SelectSpec | None = None  # the `select:` section
    compare: list[CompareSpec] | None = None
    all_runs: list[RunSpec] | None = None  # after `select`: every run (a selected run may take another's choice)
    kind = "runs"

    def select(self, names) -> Recipe:
        """The same recipe restricted to the runs `names` (in recipe order); unknown names raise [`RecipeError`]."""
        known = [r.name for r in self.runs]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(
                [("runs", f"no run named {n!r}.{suggest(n, known)} Runs: {', '.join(known)}") for n in unknown],
                self.source,
            )
        return dataclasses.replace(
            self, runs=[r for r in self.runs if r.name in set(names)], all_runs=self.all_runs or self.runs
        )


# --------------------------------------------------------------------------------------------------------------------
# Resolution helpers (import host libraries lazily: validation must stay cheap)


def adapter_types() -> dict[str, Any]:
    """`{PEFT type name: config class}` of every adapter peft knows, regtune's included (`import regtune`)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import regtune  # noqa: F401  (registers regtune's adapter types)

    return {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def resolve_trainer(name: str):
    """
    Resolve a recipe's `trainer:` to `(trainer class, config class)`.

    `name` is a class of `regtune.trainers` (`RegTrainer`, the default), `Trainer` (transformers'), or a dotted
    import path (`trl.SFTTrainer`). The config class is the trainer's `config_class` attribute, else the most
    specific `TrainingArguments` subclass in the annotation of its `args` parameter, else `TrainingArguments`.
    Raises `ValueError`.
    """
    from transformers import Trainer

    if name == "Trainer":
        cls = Trainer
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {name!r}: {e}") from None
    else:
        import regtune.trainers as trainers

        cls = getattr(trainers, name, None)
        if cls is None:
            raise ValueError(
                unknown_choice("trainer", name, [n for n in trainers.__all__ if n.endswith("Trainer")] + ["Trainer"])
            )
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise ValueError(f"{name!r} is not a transformers.Trainer subclass")
    return cls, trainer_config_class(cls)


def trainer_config_class(cls):
    """
    The `TrainingArguments` subclass a trainer class takes as `args`: its `config_class` attribute if it has one,
    else the most specific `TrainingArguments` subclass annotated on `args` by the first `__init__` in its MRO that
    annotates it (a mixin's `__init__(*args, **kwargs)` does not hide the host's `args: SFTConfig`).
    """
    from transformers import TrainingArguments

    config_cls = getattr(cls, "config_class", None)
    if isinstance(config_cls, type) and issubclass(config_cls, TrainingArguments):
        return config_cls
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            annotation = typing.get_type_hints(init).get("args")
        except Exception:
            continue
        if annotation is None:
            continue
        candidates = [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type)]
        candidates = [a for a in candidates if issubclass(a, TrainingArguments)]
        if candidates:
            return max(candidates, key=lambda a: len(a.__mro__))
    return TrainingArguments


# --------------------------------------------------------------------------------------------------------------------
# Validation of one merged run


def _check_name(value, path: str, errors: Errors, what: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        errors.add(path, f"{what} must be a string of letters, digits, '.', '_' or '-' (a folder name), got {value!r}")


def _takes_keyword(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _validate_model(raw, errors: Errors) -> ModelSpec:
    spec = check_model(raw, ModelSpec, "model", errors, "the model section")
    if (spec.name_or_path is None) == (spec.config is None):
        errors.add("model", "set exactly one of `name_or_path` (Hub id, local directory, builtin:<name>) and `config`")
    for key in ("name_or_path", "tokenizer"):
        value = getattr(spec, key)
        if isinstance(value, str) and value.startswith("builtin:"):
            name = value[len("builtin:") :]
            if name not in BUILTIN_MODELS:
                shown = ["builtin:" + n for n in BUILTIN_MODELS]
                errors.add(f"model.{key}", unknown_choice("built-in model", name, BUILTIN_MODELS, shown))
        elif isinstance(value, str) and _missing_local_path(value):
            errors.add(
                f"model.{key}",
                f"no such local directory {value!r}, and not a Hub id (a Hub id is `name` or `owner/name`)",
            )
    if spec.head is None:
        for key in ("prototypes", "logit_scale", "class_descriptions"):
            if key in raw:
                errors.add(f"model.{key}", "only with `head: class-descriptions`")
    elif spec.task == "causal-lm":
        errors.add("model.head", "`class-descriptions` is a classification head (model.task: sequence-classification)")
    if spec.config is not None:
        if not isinstance(spec.config.get("model_type"), str):
            errors.add("model.config.model_type", "required: the transformers model type, e.g. bert, llama, gpt2")
        if spec.tokenizer is None:
            errors.add(
                "model.tokenizer", "required with `model.config` (a model built from a config has no tokenizer)"
            )
    return spec


def _missing_local_path(value: str) -> bool:
    """Whether `value` names a local path (not a Hub id) that does not exist: checked before anything is loaded."""
    if os.path.exists(os.path.expanduser(value)):
        return False
    return value.startswith(("/", ".", "~")) or not HUB_ID_RE.match(value)


def _validate_data(raw, errors: Errors) -> DataSpec:
    from regtune.data import BUILTIN_TASKS

    spec = check_model(raw, DataSpec, "data", errors, "the data section")
    if (spec.builtin is None) == (spec.path is None):
        errors.add("data", "set exactly one of `builtin` (a built-in task) and `path` (datasets.load_dataset)")
    if spec.builtin is not None:
        task = BUILTIN_TASKS.get(spec.builtin)
        if task is None:
            errors.add("data.builtin", unknown_choice("built-in task", spec.builtin, BUILTIN_TASKS))
        else:
            ranges = getattr(task, "option_ranges", {})
            what = f"task {task.name!r}"
            n_errors = len(errors.items)
            spec.options = check_mapping(spec.options, task.build, "data.options", errors, ranges=ranges, what=what)
            if task.check_options is not None and len(errors.items) == n_errors:
                for key, message in task.check_options(spec.options):
                    errors.add(f"data.options.{key}", message)
        for key in ("path", "name", "data_files", "revision"):
            if getattr(spec, key) is not None:
                errors.add(f"data.{key}", "only for `path` data sets, not with `builtin`")
    elif spec.options:
        errors.add("data.options", "only for `builtin` tasks; pass load_dataset arguments as data.name / data_files")
    return spec


def _validate_adapter(raw, task: str, errors: Errors, own_head: bool = False) -> AdapterSpec | None:
    if raw is None:
        return None  # full fine-tuning
    if not isinstance(raw, dict):
        errors.add("adapter", f"expected a mapping with `type` (e.g. `{{type: LORA, r: 8}}`) or null, got {raw!r}")
        return None
    raw = dict(raw)
    type_name = raw.pop("type", None)
    types_ = adapter_types()
    if not isinstance(type_name, str):
        errors.add("adapter.type", f"required: the peft type name, one of {', '.join(sorted(types_))}")
        return None
    canonical = type_name.upper()
    if canonical not in types_:
        errors.add(
            "adapter.type",
            f"unknown adapter type {type_name!r}.{suggest(canonical, types_)} Known: {', '.join(sorted(types_))}",
        )
        return None
    config_cls = types_[canonical]
    n_errors = len(errors.items)
    kwargs = check_mapping(
        raw,
        config_cls,
        "adapter",
        errors,
        forbidden=ADAPTER_FORBIDDEN,
        exclude=("auto_mapping",),
        ranges=ADAPTER_RANGES,
    )
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if "task_type" in fields and kwargs.get("task_type") is None and not own_head:  # no task head to train
        kwargs["task_type"] = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}[task]
    spec = AdapterSpec(type=canonical, kwargs=kwargs, config_cls=config_cls)
    if len(errors.items) == n_errors:  # the config's own __post_init__ checks (ranges, combinations)
        construct_checked(spec.build_config, "adapter", kwargs, errors, config_cls.__name__)
    return spec


def _validate_regularizers(raw, errors: Errors) -> list[RegularizerSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.add("regularizers", f"expected a list of {{type: name, ...}} mappings, got {raw!r}")
        return []
    from regtune.regularizers import REGULARIZERS as registry
    from regtune.regularizers import regularizer_class

    specs = []
    for i, item in enumerate(raw):
        path = join_path("regularizers", i)
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            errors.add(path, f"expected a mapping with a `type` (one of {', '.join(sorted(registry))}), got {item!r}")
            continue
        kwargs = {k: v for k, v in item.items() if k != "type"}
        name = item["type"]
        try:  # a registered name, or an import path `my_pkg.module:MyRegularizer` (imported here)
            cls = regularizer_class(name)
        except ValueError as e:
            errors.add(
                f"{path}.type", unknown_choice("regularizer", name, registry) if name.isidentifier() else str(e)
            )
            continue
        n_errors = len(errors.items)
        kwargs = check_mapping(kwargs, cls, path, errors, what=f"regularizer {name!r}")
        if len(errors.items) == n_errors:  # the regularizer's own checks (ranges, combinations); building is cheap
            from regtune.regularizers import build_regularizer

            build = lambda name=name, kwargs=kwargs: build_regularizer(name, **copy.deepcopy(kwargs))  # noqa: E731
            construct_checked(build, path, kwargs, errors, f"regularizer {name!r}")
        specs.append(RegularizerSpec(type=name, kwargs=kwargs))
    return specs


def _validate_training(raw, config_cls, errors: Errors) -> dict:
    n_errors = len(errors.items)
    training = check_mapping(raw, config_cls, "training", errors, forbidden=TRAINING_FORBIDDEN, ranges=TRAINING_RANGES)
    if len(errors.items) == n_errors:
        build = lambda: config_cls(output_dir="regtune-validation", **copy.deepcopy(training))  # noqa: E731
        construct_checked(build, "training", training, errors, config_cls.__name__)
    return training


def _validate_evaluation(raw, task: str, data: DataSpec, errors: Errors) -> EvaluationSpec:
    from regtune.data import BUILTIN_TASKS

    spec = check_model(raw, EvaluationSpec, "evaluation", errors, "the evaluation section")
    if spec.splits is None and data.builtin in BUILTIN_TASKS:
        spec.splits = list(BUILTIN_TASKS[data.builtin].eval_splits)
    if spec.metrics is None and task == "sequence-classification":
        spec.metrics = ["accuracy"]
    if spec.metrics and task != "sequence-classification":
        errors.add(
            "evaluation.metrics",
            f"the {task} task reports loss and perplexity only (always: leave `metrics` out); other metrics "
            "(rouge, bleu, ...) need generated text, which recipes do not produce. Metrics such as accuracy, "
            "macro_f1 or f1 need model.task: sequence-classification",
        )
    elif spec.metrics:
        _check_metrics(spec.metrics, errors)
    if isinstance(spec.splits, dict):
        for display in spec.splits:
            _check_name(display, f"evaluation.splits.{display}", errors, "a display name")
    return spec


def metric_name(item: str | dict) -> str:
    """The name of an item of `evaluation.metrics` (a string or `{name: ..., args: ...}`)."""
    return item if isinstance(item, str) else item.get("name")


def metric_args(item: str | dict) -> dict:
    """The `args` of an item of `evaluation.metrics` (`{}` for a plain name)."""
    return {} if isinstance(item, str) else dict(item.get("args") or {})


def _check_metrics(metrics: list, errors: Errors) -> None:
    """
    The form of `evaluation.metrics` (loading an `evaluate` metric waits for the run): built-in names, `evaluate`
    names (`f1`, `user/metric`) or existing local metric folders; a near miss of a built-in name is an error.
    """
    seen: dict[str, int] = {}
    for i, item in enumerate(metrics):
        path = join_path("evaluation.metrics", i)
        if isinstance(item, dict):
            before = len(errors.items)
            check_model(item, MetricSpec, path, errors, "a metric ({name: ..., args: {...}})")
            if len(errors.items) > before:
                continue
        name = metric_name(item)
        if name in seen:
            errors.add(path, f"{name!r} is listed twice (also evaluation.metrics[{seen[name]}]): results share keys")
        seen.setdefault(name, i)
        if name in BUILTIN_METRICS:
            if metric_args(item):
                errors.add(f"{path}.args", f"the built-in metric {name!r} takes no args")
            continue
        if name in LOWER_IS_BETTER:
            errors.add(path, f"{name!r}: the loss is always reported; perplexity is causal-lm's (not a metric to ask)")
        elif os.path.exists(name):
            continue  # a local evaluate metric folder or script
        elif difflib.get_close_matches(name, BUILTIN_METRICS, cutoff=0.75):
            errors.add(path, f"unknown built-in metric {name!r}.{suggest(name, BUILTIN_METRICS)}")
        elif not HUB_ID_RE.match(name):
            errors.add(
                path,
                f"expected a built-in metric ({', '.join(BUILTIN_METRICS)}), an evaluate metric name (f1, precision, "
                f"...) or an existing local metric folder, got {name!r}",
            )


def validate_run(raw: dict) -> RunSpec:
    """Validate one merged run (a recipe without `runs:`). Raises [`RecipeError`] with every problem found."""
    from regtune.data import BUILTIN_TASKS

    errors = Errors()
    name = raw.get("name")
    _check_name(name, "name", errors, "the run name")
    description = check_value(raw.get("description"), str | None, "description", errors)
    seed = check_value(raw.get("seed", 42), int, "seed", errors, ge=0)
    trainer_name = check_value(raw.get("trainer", "RegTrainer"), str, "trainer", errors)
    from transformers import TrainingArguments

    config_cls, trainer_cls = TrainingArguments, None
    if isinstance(trainer_name, str):
        try:
            trainer_cls, config_cls = resolve_trainer(trainer_name)
        except ValueError as e:
            errors.add("trainer", str(e))
    for key, kind in (("model", dict), ("data", dict)):
        if not isinstance(raw.get(key), kind):
            errors.add(key, f"required: a mapping (got {raw.get(key)!r})")
    model = _validate_model(raw.get("model") if isinstance(raw.get("model"), dict) else {}, errors)
    data = _validate_data(raw.get("data") if isinstance(raw.get("data"), dict) else {}, errors)
    task = model.task if model.task in TASKS else None
    if task is None:
        builtin = BUILTIN_TASKS.get(data.builtin) if data.builtin else None
        task = builtin.problem if builtin is not None else "sequence-classification"
    adapter = _validate_adapter(raw.get("adapter"), task, errors, own_head=model.head is not None)
    regularizers = _validate_regularizers(raw.get("regularizers"), errors)
    if regularizers and trainer_cls is not None and not _takes_keyword(trainer_cls, "regularizers"):
        errors.add("regularizers", f"the trainer {trainer_name!r} takes no regularizers; use trainer: RegTrainer")
    training = _validate_training(raw.get("training"), config_cls, errors)
    evaluation = _validate_evaluation(raw.get("evaluation"), task, data, errors)
    errors.raise_if_any()
    return RunSpec(
        name=name,
        description=description,
        seed=seed,
        trainer=trainer_name,
        task=task,
        model=model,
        data=data,
        adapter=adapter,
        regularizers=regularizers,
        training=training,
        evaluation=evaluation,
    )


# --------------------------------------------------------------------------------------------------------------------
# Runs: merging and error attribution


def merge_run(base: dict, run: dict) -> dict:
    """
    Apply the run `run` to the base sections `base`: mappings merge key by key (recursively), lists and scalars
    replace. An `adapter` whose `type` differs from the base adapter's replaces it whole (ALLoRA does not inherit
    LoRA's `lora_alpha`); `adapter: null` means full fine-tuning.
    """
    merged = copy.deepcopy(base)
    for key, value in run.items():
        old = merged.get(key)
        if key == "adapter" and isinstance(value, dict) and isinstance(old, dict):
            if str(value.get("type", old.get("type"))).upper() != str(old.get("type")).upper():
                merged[key] = copy.deepcopy(value)
                continue
        merged[key] = _deep_merge(old, value)
    return merged


def _deep_merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _deep_merge(base.get(k), v)
        return out
    return copy.deepcopy(override)


def _defined_in(data, path: str) -> bool:
    """Whether the (possibly nested) key path `path` (`a.b[0].c`) is set in `data`."""
    node = data
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        part = int(token[1:-1]) if token.startswith("[") else token
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def validate_recipe(raw: Any, source: str | None = None, default_name: str | None = None) -> Recipe:
    """
    Validate recipe data (parsed YAML, overrides applied) into a [`Recipe`].

    Checks the top-level keys, then every run (the base sections with the run's overrides merged in, see
    [`merge_run`]), and every value of a run's `sweep`. An error inside a value that a run sets is reported under
    `runs[i]....`, one inside a base section under its plain path, once. Raises [`RecipeError`] listing every
    problem.
    """
    errors = Errors()
    if not isinstance(raw, dict):
        raise RecipeError([("", f"a recipe is a YAML mapping, got {type(raw).__name__}")], source)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            errors.add(str(key), unknown_key(key, TOP_LEVEL_KEYS, label="unknown top-level key"))
    name = raw.get("name", default_name)
    _check_name(name, "name", errors, "the recipe name (set `name:`)")
    description = check_value(raw.get("description"), str | None, "description", errors)
    output_dir = check_value(raw.get("output_dir", f"runs/{name}"), str, "output_dir", errors)
    seeds = check_value(raw.get("seeds"), list[Annotated[int, Field(ge=0)]] | None, "seeds", errors)
    if isinstance(seeds, list) and (not seeds or len(set(seeds)) != len(seeds)):
        errors.add("seeds", f"expected a non-empty list of distinct seeds, got {seeds!r}")
    selection = check_model(raw["select"], SelectSpec, "select", errors) if "select" in raw else None
    compare = None
    if "compare" in raw:
        items = raw["compare"] if isinstance(raw["compare"], list) else [raw["compare"]]
        paths = [join_path("compare", i) if isinstance(raw["compare"], list) else "compare" for i in range(len(items))]
        compare = [check_model(item, CompareSpec, path, errors) for item, path in zip(items, paths)]
    runs_raw = raw.get("runs")
    single = runs_raw is None
    if single:
        runs_raw = [{}]
    elif not isinstance(runs_raw, list) or not runs_raw:
        errors.add("runs", f"expected a non-empty list of runs ({{name: ..., <overrides>}}), got {runs_raw!r}")
        runs_raw = []
    errors.raise_if_any(source)

    base = {k: v for k, v in raw.items() if k in RUN_KEYS and k not in ("name",) + RUN_ONLY_KEYS}
    runs, seen = [], {}
    for i, run_raw in enumerate(runs_raw):
        prefix = "" if single else join_path("runs", i)
        if not isinstance(run_raw, dict):
            errors.add(prefix, f"expected a mapping ({{name: ..., <overrides>}}), got {run_raw!r}")
            continue
        bad = [k for k in run_raw if k not in RUN_KEYS]
        for key in bad:
            errors.add(join_path(prefix, key), unknown_key(key, RUN_KEYS, label="unknown key in a run"))
        if bad:
            continue
        if single:
            adapter = raw.get("adapter")
            run_raw = {"name": str(adapter.get("type", "adapter")).lower() if isinstance(adapter, dict) else "full"}
        elif "name" not in run_raw:
            errors.add(join_path(prefix, "name"), "required: every run needs a name (its folder under output_dir)")
            continue
        sweep_raw, select_raw = run_raw.get("sweep"), run_raw.get("select")
        run_raw = {k: v for k, v in run_raw.items() if k not in RUN_ONLY_KEYS}
        merged = merge_run(base, run_raw)
        spec = _validate_merged(merged, run_raw, prefix, single, errors)
        if spec is not None:
            _validate_sweep(spec, merged, sweep_raw, select_raw, join_path(prefix, "sweep"), errors)
            if select_raw is not None:
                rule = check_model(select_raw, RunSelectSpec, join_path(prefix, "select"), errors)
                spec.match, spec.values_from = rule.match, rule.values_from
            runs.append(spec)
        name_i = run_raw.get("name")
        if isinstance(name_i, str) and name_i in seen:  # (a name that is no string is reported above)
            errors.add(join_path(prefix, "name"), f"duplicate run name {name_i!r} (also runs[{seen[name_i]}])")
        if isinstance(name_i, str):
            seen.setdefault(name_i, i)
    _check_protocol(runs, seeds, selection, compare, raw, errors, declared=list(seen))
    errors.raise_if_any(source)
    raw = {"name": name, **{k: v for k, v in raw.items() if k != "name"}}  # a name taken from the file name is kept
    if seeds is not None and selection is None and any(r.sweep for r in runs):
        selection = SelectSpec()
    return Recipe(
        name=name,
        description=description,
        output_dir=output_dir,
        runs=runs,
        raw=raw,
        source=source,
        seeds=seeds,
        selection=selection,
        compare=compare,
    )


def _validate_merged(merged: dict, run_raw: dict, prefix: str, single: bool, errors: Errors) -> RunSpec | None:
    """[`validate_run`] on a merged run; its errors go to `errors` under the run's or the base's key paths."""
    try:
        return validate_run(merged)
    except RecipeError as e:
        for path, message in e.errors:
            from_run = not single and (path == "name" or _defined_in(run_raw, path))
            errors.add(join_path(prefix, path) if from_run else path, message)
    return None


def set_path(data: dict, dotted: str, value) -> dict:
    """A copy of `data` with the mapping key path `dotted` (`training.learning_rate`) set to `value`."""
    out = copy.deepcopy(data)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def _validate_sweep(spec: RunSpec, merged: dict, sweep, select, path: str, errors: Errors) -> None:
    """Check a run's `sweep` (`{key path: [values]}`) and build one validated variant per combination of values."""
    if sweep is None:
        return
    if not isinstance(sweep, dict) or not sweep:
        errors.add(
            path,
            f"expected a mapping {{key.path: [values]}} (e.g. training.learning_rate: [1e-4, 1e-3]), got {sweep!r}",
        )
        return
    for key, values in sweep.items():
        if not isinstance(key, str) or key.split(".")[0] not in SECTION_KEYS + ("seed", "trainer"):
            errors.add(join_path(path, str(key)), f"a sweep key is a key path inside {', '.join(SECTION_KEYS)}")
            return
        if not isinstance(values, list) or not values:
            errors.add(join_path(path, key), f"expected a non-empty list of values, got {values!r}")
            return
    keys = list(sweep)
    for combo in itertools.product(*(sweep[k] for k in keys)):
        values = dict(zip(keys, combo))
        variant = merged
        for key, value in values.items():
            variant = set_path(variant, key, value)
        try:
            spec.variants.append((values, validate_run(variant)))
        except RecipeError as e:
            for p, message in e.errors:
                errors.add(join_path(path, p), f"with {values}: {message}")
    spec.sweep = dict(sweep)


def _check_protocol(
    runs: list[RunSpec], seeds, selection, compare, raw: dict, errors: Errors, declared: list[str] = ()
) -> None:
    """
    Checks across runs: `seeds` with the sections that need it, `select` rules and `compare` names. A name in
    `declared` (a run of the recipe that failed its own validation, reported there) is not reported again as unknown.
    """
    names = {r.name: r for r in runs}
    declared = list(dict.fromkeys([*declared, *names]))  # in the recipe's order
    if selection is not None and selection.metric not in LOWER_IS_BETTER + BUILTIN_METRICS:
        others = [m for r in runs for m in r.evaluation.metrics or [] if metric_name(m) not in BUILTIN_METRICS]
        if (
            not others and len(runs) == len(declared)
        ):  # (a run that failed validation is reported already)  # an evaluate metric's result keys are known once it ran: checked then
            known = LOWER_IS_BETTER + BUILTIN_METRICS
            errors.add(
                "select.metric",
                f"expected one of {', '.join(known)} or a result of a metric in evaluation.metrics (none is "
                f"configured), got {selection.metric!r}.{suggest(selection.metric, known)}",
            )
    needs_seeds = [k for k in ("select", "compare") if k in raw]
    if any(r.sweep for r in runs):
        needs_seeds.append("sweep")
    if seeds is None and needs_seeds:
        errors.add("seeds", f"required with {', '.join(needs_seeds)}: the seeds every run is trained with")
    for i, run in enumerate(runs):
        prefix = join_path("runs", i)
        for key, target in (("match", run.match), ("values_from", run.values_from)):
            if target is None:
                continue
            other = names.get(target)
            if other is None and target in declared:
                continue  # that run's own errors are reported
            if other is None or other is run:
                errors.add(
                    f"{prefix}.select.{key}",
                    f"expected the name of another run.{suggest(target, names)} Runs: {', '.join(names)}",
                )
            elif not other.sweep or other.match or other.values_from:
                errors.add(f"{prefix}.select.{key}", f"run {target!r} chooses no value of its own (it needs a sweep)")
        if run.match and not run.sweep:
            errors.add(f"{prefix}.select.match", "needs a `sweep` in this run: the values to choose from")
        if run.values_from and run.sweep:
            errors.add(f"{prefix}.sweep", "a run with `select.values_from` takes its values from that run: no sweep")
        if run.match and run.values_from:
            errors.add(f"{prefix}.select", "set one of `match` and `values_from`")
    for i, item in enumerate(compare or []):
        path = join_path("compare", i) if isinstance(raw.get("compare"), list) else "compare"
        baselines = [item.baseline] if isinstance(item.baseline, str) else list(item.baseline)
        for key, listed in (("baseline", baselines), ("runs", item.runs or [])):
            for b in listed:
                if b not in declared:
                    errors.add(
                        f"{path}.{key}",
                        f"no run named {b!r}.{suggest(b, declared)} Runs: {', '.join(declared)}",
                    )
        if len(baselines) >= len(declared):
            errors.add(f"{path}.baseline", "every run is a baseline: nothing to compare")
        for j, metric in enumerate(item.metrics or []):
            if metric.count(".") < 1:
                errors.add(f"{path}.metrics[{j}]", f"expected `split.metric` (test.accuracy), got {metric!r}")
