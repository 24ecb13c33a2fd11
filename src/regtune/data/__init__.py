"""Built-in tasks: small data sets that regtune generates itself, so that recipes run with no download.

A recipe names one with `data: {builtin: <name>, options: {...}}`; `options` are the keyword arguments of its
`build` function.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from . import fewshot_text, noisy_labels, shakespeare, token_mlp  # noqa: F401 (token_mlp registers `regtune-token-mlp`)
from .models import BUILTIN_MODELS, BuiltinModel, resolve_model_path
from .quickstart import quickstart_sentiment


@dataclass(frozen=True)
class BuiltinTask:
    """
    A data set that regtune builds locally.

    Args:
        name (`str`): the name recipes use (`data.builtin`).
        build (`Callable[..., datasets.DatasetDict]`): builds the splits; its keyword arguments are the task's options.
        description (`str`): one line for listings and model cards.
        problem (`str`, defaults to `"sequence-classification"`): the model head the task needs.
        text_column (`str`, defaults to `"text"`): the input column.
        label_column (`str`, defaults to `"label"`): the target column (a `ClassLabel` for classification).
        train_split (`str`, defaults to `"train"`): the split to train on.
        eval_splits (`tuple[str, ...]`): the splits a recipe evaluates on when it names none.
        option_ranges (`dict[str, dict]`): bounds of numeric options (`{"n_train": {"ge": 2}}`), checked when a
            recipe is validated, before anything is built.
        check_options (`Callable[[dict], list[tuple[str, str]]]`, *optional*): more checks of the options at
            validation (e.g. that the data files exist), as `(option, message)` pairs.
        class_descriptions (`Callable[..., list[str]]`, *optional*): called with the options, one natural-language
            description per class (what a `class-descriptions` model head compares a text with).
        summarize (`Callable[[dict], dict]`, *optional*): metrics derived from the evaluated splits'
            (`{split: {metric: value}}` -> `{name: {metric: value}}`, e.g. the harmonic mean of base and novel
            accuracy).
    """

    name: str
    build: Callable
    description: str
    problem: str = "sequence-classification"
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"
    eval_splits: tuple[str, ...] = field(default_factory=tuple)
    option_ranges: dict = field(default_factory=dict)
    check_options: Callable | None = None
    class_descriptions: Callable | None = None
    summarize: Callable | None = None


BUILTIN_TASKS: dict[str, BuiltinTask] = {}


def register_task(task: BuiltinTask) -> BuiltinTask:
    """Add `task` to [`BUILTIN_TASKS`] (replacing a task of the same name) and return it."""
    BUILTIN_TASKS[task.name] = task
    return task


def get_task(name: str) -> BuiltinTask:
    """Return the built-in task `name`; raise `ValueError` naming the known tasks (closest first) otherwise."""
    if name not in BUILTIN_TASKS:
        close = difflib.get_close_matches(name, list(BUILTIN_TASKS), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown built-in task {name!r}.{hint} Known tasks: {', '.join(sorted(BUILTIN_TASKS))}.")
    return BUILTIN_TASKS[name]


def load_task(name: str, **options):
    """Build the splits of the built-in task `name` (a `datasets.DatasetDict`)."""
    return get_task(name).build(**options)


register_task(
    BuiltinTask(
        name="quickstart-sentiment",
        build=quickstart_sentiment,
        description="Binary sentiment of templated sentences; the held-out split uses sentiment words unseen in training.",
        eval_splits=("in_distribution", "held_out"),
        option_ranges={"n_train": {"ge": 2}, "n_eval": {"ge": 2}},
    )
)


def _text_task(name: str, build: Callable, description: str, eval_splits: tuple[str, ...], **extra) -> BuiltinTask:
    """A task over the text classification data sets of `fewshot_text` (shared options, checks and descriptions)."""
    return BuiltinTask(
        name=name,
        build=build,
        description=description,
        eval_splits=eval_splits,
        option_ranges={"k": {"ge": 1}, "n_val": {"ge": 0}, "max_test_per_class": {"ge": 1}, "seed": {"ge": 0}},
        check_options=fewshot_text.check_options,
        class_descriptions=fewshot_text.class_descriptions,
        **extra,
    )


register_task(
    _text_task(
        "base-to-novel",
        fewshot_text.base_to_novel,
        "k shots of the base classes of TREC / AG News / SST-2 / MR; tested on base and novel classes.",
        ("test_base", "test_novel"),
        summarize=fewshot_text.base_novel_summary,
    )
)
register_task(
    _text_task(
        "few-shot",
        fewshot_text.few_shot,
        "k shots of every class of TREC / AG News / SST-2 / MR; tested on the test set.",
        ("test",),
    )
)
register_task(
    BuiltinTask(
        name="shakespeare-turns",
        build=shakespeare.shakespeare_turns,
        description="One speaker's turns of Tiny Shakespeare as prompt/completion pairs; held-out text for forgetting.",
        problem="causal-lm",
        eval_splits=("test", "held_out"),
        option_ranges=shakespeare.OPTION_RANGES,
        check_options=shakespeare.check_options,
    )
)

register_task(
    BuiltinTask(
        name="noisy-labels",
        build=noisy_labels.noisy_labels_task,
        description="Digits (8x8 pixels as tokens) or (a + b) mod p with seeded label noise on train/validation; "
        "clean test; the mislabeled training examples as two extra splits (given and true labels).",
        eval_splits=("test", "noisy_train", "noisy_train_true"),
        option_ranges={"noise_rate": {"ge": 0.0, "le": 1.0}, "n_train": {"ge": 2}, "n_val": {"ge": 1}, "p": {"ge": 2}},
    )
)

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TASKS",
    "BuiltinModel",
    "BuiltinTask",
    "get_task",
    "load_task",
    "quickstart_sentiment",
    "register_task",
    "resolve_model_path",
]
