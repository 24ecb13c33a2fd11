"""Few-shot and base-to-novel text classification over real data sets (TREC, SST-2, MR, AG News) read from files.

The files are the ones the project's shared data folder holds (by default `../shared/data`, relative to the working
directory; a recipe sets `data.options.data_dir`):

| data set | files under `data_dir` | training pool | test set |
|---|---|---|---|
| `trec` | `trec/train_5500.label`, `trec/TREC_10.label` | train_5500 | TREC_10 (500 questions) |
| `sst2` | `sst2/train.tsv`, `sst2/dev.tsv` | train.tsv | dev.tsv (872 sentences) |
| `mr` | `mr/rt-polarity.pos`, `mr/rt-polarity.neg` | 80% of the sentences | a fixed 20% (shuffled with seed 0) |
| `ag_news` | `ag_news/test.csv` | a fixed 100 articles per class (seed 0) | the other 7,200 |

Two built-in tasks read them (`data: {builtin: base-to-novel | few-shot, options: {...}}`):

- **few-shot**: `k` examples per class drawn from the pool with the run's `seed`; splits `train`, `validation`
  (`n_val` further pool examples per class, disjoint from the shots: never test data) and `test`.
- **base-to-novel** (CoOp's protocol on text): the classes are split into *base* classes (default: the first half
  of the canonical label order) and *novel* ones (the rest). The model trains on `k` shots of each base class;
  splits `train`, `validation` (base classes), `test_base` (base-class test examples, classified among the base
  classes), `test_novel` (novel-class test examples, classified among the novel classes) and `test` (every test
  example among all classes). The runner adds `H`, the harmonic mean of base and novel accuracy.

Every example has `text`, `label` (an index into all the data set's classes) and `class_mask` (1 for the classes
it is classified among). The shots do not depend on `n_val`: the `k` shots of a class are drawn first, then its
validation examples from the rest of the pool, with the same seeded generator.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence


DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")
POOL_SEED = 0  # the fixed carve-outs (MR's test set, AG News's pool, test subsamples)
AG_NEWS_POOL_PER_CLASS = 100

# canonical label orders (TREC: the coarse-label order of the Hub's `trec`; AG News: classes.txt order)
TREC_LABELS = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SST2_LABELS = ["negative", "positive"]
LABELS = {"trec": TREC_LABELS, "sst2": SST2_LABELS, "mr": SST2_LABELS, "ag_news": AG_NEWS_LABELS}
DATASETS = tuple(LABELS)
FILES = {
    "trec": ("trec/train_5500.label", "trec/TREC_10.label"),
    "sst2": ("sst2/train.tsv", "sst2/dev.tsv"),
    "mr": ("mr/rt-polarity.pos", "mr/rt-polarity.neg"),
    "ag_news": ("ag_news/test.csv",),
}
# One short natural-language description per class: what a dual encoder compares a text with.
DESCRIPTIONS = {
    "trec": {
        "ABBR": "a question asking for an abbreviation",
        "ENTY": "a question asking for an entity",
        "DESC": "a question asking for a description",
        "HUM": "a question asking for a person",
        "LOC": "a question asking for a location",
        "NUM": "a question asking for a number",
    },
    "ag_news": {
        "World": "a news article about world politics",
        "Sports": "a news article about sports",
        "Business": "a news article about business",
        "Sci/Tech": "a news article about science and technology",
    },
    "sst2": {
        "negative": "a movie review with negative sentiment",
        "positive": "a movie review with positive sentiment",
    },
}
DESCRIPTIONS["mr"] = DESCRIPTIONS["sst2"]


# ------------------------------------------------------------------------------------------------------ readers
def read_trec(path: str, labels: Sequence[str] = TREC_LABELS) -> list[tuple[str, int]]:
    """TREC's `LABEL:fine text` lines (latin-1: train_5500.label is not valid UTF-8); labels index `labels`."""
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if line:
                tag, text = line.split(" ", 1)
                out.append((text, list(labels).index(tag.split(":", 1)[0])))
    return out


def read_sst2(path: str) -> list[tuple[str, int]]:
    """SST-2's `sentence<TAB>label` TSV with a header row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(row[0].strip(), int(row[1])) for row in rows]


def read_mr(directory: str) -> list[tuple[str, int]]:
    """Movie reviews (rt-polarity.neg = 0, rt-polarity.pos = 1), in file order."""
    rows = []
    for label, suffix in ((0, "neg"), (1, "pos")):
        with open(os.path.join(directory, f"rt-polarity.{suffix}"), encoding="utf-8", errors="replace") as f:
            rows += [(line.strip(), label) for line in f if line.strip()]
    return rows


def read_ag_news(path: str, joiner: str = ". ") -> list[tuple[str, int]]:
    """AG News' `class,title,description` CSV (classes 1-4 become 0-3); the text is `title + joiner + description`."""
    with open(path, newline="", encoding="utf-8") as f:
        return [
            (f"{title}{joiner}{desc}".replace("\\n", " ").replace("\\", " ").strip(), int(cls) - 1)
            for cls, title, desc in csv.reader(f)
        ]


def per_class_sample(rows: list[tuple[str, int]], n_classes: int, n: int, seed: int) -> list[int]:
    """Indices of a seeded sample of at most `n` rows of every class (all of a class's rows when it has fewer)."""
    rng = random.Random(seed)
    keep = []
    for c in range(n_classes):
        ids = [i for i, (_, y) in enumerate(rows) if y == c]
        keep += ids if len(ids) <= n else rng.sample(ids, n)
    return sorted(keep)


def load_pool_and_test(
    dataset: str, data_dir: str = DEFAULT_DATA_DIR, max_test_per_class: int | None = None
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """
    `(training pool, test set)` of `dataset` as `(text, label index)` lists (see the module docstring for the files);
    `max_test_per_class` keeps a fixed (seed 0) subsample of each class's test examples.
    """
    path = lambda name: os.path.join(data_dir, name)  # noqa: E731
    if dataset == "trec":
        pool, test = read_trec(path(FILES["trec"][0])), read_trec(path(FILES["trec"][1]))
    elif dataset == "sst2":
        pool, test = read_sst2(path(FILES["sst2"][0])), read_sst2(path(FILES["sst2"][1]))
    elif dataset == "mr":
        rows = read_mr(path("mr"))
        random.Random(POOL_SEED).shuffle(rows)
        n_test = len(rows) // 5
        pool, test = rows[n_test:], rows[:n_test]
    elif dataset == "ag_news":
        rows = read_ag_news(path(FILES["ag_news"][0]))
        pool_ids = set(per_class_sample(rows, len(AG_NEWS_LABELS), AG_NEWS_POOL_PER_CLASS, POOL_SEED))
        pool = [rows[i] for i in sorted(pool_ids)]
        test = [row for i, row in enumerate(rows) if i not in pool_ids]
    else:
        raise ValueError(f"`dataset` must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if max_test_per_class:
        test = [test[i] for i in per_class_sample(test, len(LABELS[dataset]), max_test_per_class, POOL_SEED)]
    return pool, test


def sample_shots(
    pool: list[tuple[str, int]], classes: Sequence[int], k: int, seed: int, n_val: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """
    `(train, validation)`: `k` shots and then `n_val` validation examples of each class in `classes`, drawn from
    `pool` without overlap by `random.Random(seed)` (all shots first, so they do not depend on `n_val`). Labels are kept
    as they are.
    """
    rng = random.Random(seed)
    ids = {c: [i for i, (_, y) in enumerate(pool) if y == c] for c in classes}
    for c in classes:
        if len(ids[c]) < k + n_val:
            raise ValueError(f"class {c} has {len(ids[c])} pool examples, fewer than k + n_val = {k + n_val}")
    shots = {c: rng.sample(ids[c], k) for c in classes}  # every class's shots first, then the validation examples
    val = []
    for c in classes:
        taken = set(shots[c])
        val += [pool[i] for i in rng.sample([i for i in ids[c] if i not in taken], n_val)]
    return [pool[i] for c in classes for i in shots[c]], val


# -------------------------------------------------------------------------------------------------------- tasks
def check_options(options: dict) -> list[tuple[str, str]]:
    """Problems of the options of a text task (`(option, message)`), found without reading the data."""
    problems = []
    dataset = options.get("dataset", "trec")
    if dataset not in LABELS:
        problems.append(("dataset", f"expected one of {', '.join(DATASETS)}, got {dataset!r}"))
        return problems
    data_dir = options.get("data_dir", DEFAULT_DATA_DIR)
    missing = [f for f in FILES[dataset] if not os.path.exists(os.path.join(data_dir, f))]
    if missing:
        problems.append(
            (
                "data_dir",
                f"{dataset} needs {', '.join(missing)} under data_dir={data_dir!r} (resolved to "
                f"{os.path.abspath(data_dir)}), which does not exist; set data.options.data_dir to the folder that "
                "holds the data sets",
            )  # fmt: skip
        )
    labels = LABELS[dataset]
    for key in ("base_classes", "novel_classes"):
        unknown = [c for c in options.get(key) or [] if c not in labels]
        if unknown:
            problems.append((key, f"unknown classes {unknown} of {dataset}; its classes: {', '.join(labels)}"))
    base, novel = options.get("base_classes"), options.get("novel_classes")
    if base and novel and set(base) & set(novel):
        problems.append(("novel_classes", f"base and novel classes overlap: {sorted(set(base) & set(novel))}"))
    return problems


def class_descriptions(dataset: str = "trec", **_) -> list[str]:
    """The class descriptions of `dataset`, in its label order."""
    return [DESCRIPTIONS[dataset][label] for label in LABELS[dataset]]


def _build(dataset, k, n_val, max_test_per_class, seed, data_dir, base_classes=None, novel_classes=None, novel=True):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    problems = check_options(
        {"dataset": dataset, "data_dir": data_dir, "base_classes": base_classes, "novel_classes": novel_classes}
    )
    if problems:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
    labels = LABELS[dataset]
    pool, test = load_pool_and_test(dataset, data_dir, max_test_per_class)
    all_ids = list(range(len(labels)))
    if novel:
        half = len(labels) // 2
        base = [labels.index(c) for c in base_classes] if base_classes else all_ids[:half]
        novel_ids = (
            [labels.index(c) for c in novel_classes] if novel_classes else [c for c in all_ids if c not in base]
        )
    else:
        base, novel_ids = all_ids, []
    train, val = sample_shots(pool, base, k, seed, n_val)
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=labels), "class_mask": Sequence(Value("int8"))}
    )

    def split(rows, classes):
        mask = [int(c in classes) for c in all_ids]
        rows = [(t, y) for t, y in rows if y in classes]
        return Dataset.from_dict(
            {"text": [t for t, _ in rows], "label": [y for _, y in rows], "class_mask": [mask] * len(rows)},
            features=features,
        )

    splits = {"train": split(train, base), "validation": split(val, base), "test": split(test, all_ids)}
    if novel:
        splits["test_base"] = split(test, base)
        splits["test_novel"] = split(test, novel_ids)
    return DatasetDict(splits)


def base_to_novel(
    dataset: str = "trec",
    k: int = 16,
    base_classes: list[str] | None = None,
    novel_classes: list[str] | None = None,
    n_val: int = 0,
    max_test_per_class: int | None = None,
    seed: int = 0,
    data_dir: str = DEFAULT_DATA_DIR,
):
    """
    The base-to-novel splits of `dataset` (see the module docstring).

    Args:
        dataset (`str`, defaults to `"trec"`): `trec`, `ag_news`, `sst2` or `mr`.
        k (`int`, defaults to 16): shots per base class.
        base_classes, novel_classes (`list[str]`, *optional*): class names; default: the first half of the label
            order is base, the rest novel.
        n_val (`int`, defaults to 0): validation examples per base class, from the pool (disjoint from the shots).
        max_test_per_class (`int`, *optional*): a fixed subsample of at most this many test examples per class.
        seed (`int`, defaults to 0): draws the shots and the validation examples (a recipe's `seeds` set it).
        data_dir (`str`, defaults to `"../shared/data"`): the folder holding the data sets.
    """
    return _build(dataset, k, n_val, max_test_per_class, seed, data_dir, base_classes, novel_classes, novel=True)


def few_shot(
    dataset: str = "sst2",
    k: int = 16,
    n_val: int = 0,
    max_test_per_class: int | None = None,
    seed: int = 0,
    data_dir: str = DEFAULT_DATA_DIR,
):
    """
    The few-shot splits of `dataset` over all its classes: `train` (`k` per class), `validation` (`n_val` per
    class, disjoint from the shots) and `test`. Arguments as in [`base_to_novel`].
    """
    return _build(dataset, k, n_val, max_test_per_class, seed, data_dir, novel=False)


def harmonic_mean(a: float, b: float) -> float:
    """`2ab / (a + b)` (0 when both are 0)."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def base_novel_summary(metrics: dict[str, dict]) -> dict[str, dict]:
    """`{"H": {"accuracy": harmonic mean}}` of the `test_base` and `test_novel` accuracies when both were evaluated."""
    base, novel = metrics.get("test_base", {}), metrics.get("test_novel", {})
    if "accuracy" in base and "accuracy" in novel:
        return {"H": {"accuracy": harmonic_mean(base["accuracy"], novel["accuracy"])}}
    return {}
