"""The quickstart task: sentiment of templated sentences, trained on a few words, tested on unseen ones.

A pretrained sentence encoder already knows that "riveting" is praise and "a waste of time" is not. Fine-tuning it
on a few dozen sentences built from a handful of common sentiment words (`good`, `awful`, ...) teaches a new
classifier head those words; whether the model still recognizes *other* ways of saying the same thing afterwards
depends on how much of its pretrained knowledge the fine-tuning kept. The task therefore has two test splits:

- `in_distribution`: the training words in sentence templates never seen in training (new wording, same words);
- `held_out`: the same unseen templates with less common sentiment words and multi-word expressions that never
  occur in training.

The gap between the two is what regularization for "little data" is meant to close. Everything is generated from
fixed word lists and a seed: no download, deterministic, a few milliseconds.
"""

from __future__ import annotations

import itertools
import random


LABEL_NAMES = ("negative", "positive")

# Sentiment words seen in training (and in the in-distribution test).
TRAIN_WORDS = {
    "positive": ("good", "great", "excellent", "wonderful", "enjoyable", "pleasant", "nice", "amazing"),
    "negative": ("bad", "terrible", "awful", "boring", "poor", "unpleasant", "disappointing", "horrible"),
}
# Sentiment words and expressions that never occur in training: only the held-out test uses them. They are less
# common than the training words, and half are multi-word expressions, so that recognizing them takes what the
# pretrained model knows. (Common unseen synonyms -- superb, dreadful, ... -- are recognized ~99% of the time by
# any fine-tuning and would not tell methods apart.)
HELD_OUT_WORDS = {
    "positive": (
        "riveting", "exquisite", "sublime", "captivating", "mesmerizing", "exhilarating",
        "stellar", "top-notch", "phenomenal", "heartwarming", "flawless", "spectacular",
    ),
    "negative": (
        "lackluster", "insipid", "banal", "trite", "vapid", "forgettable",
        "underwhelming", "clumsy", "bland", "overrated", "tiresome", "shoddy",
    ),
}  # fmt: skip
HELD_OUT_EXPRESSIONS = {
    "positive": (
        "worth every penny", "a real treat", "a joy from start to finish", "better than i expected", "a pleasure",
        "right up my alley", "hard to fault", "a breath of fresh air", "money well spent", "an absolute gem",
        "beyond my expectations", "a must-see",
    ),
    "negative": (
        "a waste of time", "a total letdown", "not worth the money", "a complete mess", "worse than i expected",
        "hard to sit through", "a chore", "money down the drain", "a huge mistake", "painful to sit through",
        "a disaster", "a rip-off",
    ),
}  # fmt: skip
SUBJECTS = (
    "movie", "film", "meal", "service", "book", "hotel", "concert", "game", "album", "show", "restaurant", "trip",
)  # fmt: skip
INTENSIFIERS = ("", "really ", "very ", "quite ", "truly ", "absolutely ")
# Wordings used to build the training sentences ...
TRAIN_TEMPLATES = (
    "the {subject} was {adverb}{word}.",
    "i thought the {subject} was {adverb}{word}.",
    "what a {adverb}{word} {subject}!",
    "overall, a {adverb}{word} {subject}.",
    "my friends found the {subject} {adverb}{word}.",
    "this {subject} is {adverb}{word}.",
)
# ... and disjoint wordings for both test splits (predicative, so that they also take expressions).
TEST_TEMPLATES = (
    "honestly, the {subject} was {adverb}{word}.",
    "i have to say the {subject} was {adverb}{word}.",
    "in my opinion, this {subject} is {adverb}{word}.",
    "everyone agreed that the {subject} was {adverb}{word}.",
    "to be fair, the {subject} turned out to be {adverb}{word}.",
    "looking back, the {subject} was {adverb}{word}.",
)


def _sample(templates, words: dict, n: int, rng: random.Random, expressions: dict | None = None) -> list[dict]:
    """`n` distinct sentences, half per label (the odd one positive), drawn from all combinations.

    With `expressions`, half of each label's sentences use one of them instead of a word. Expressions (multi-word)
    take no intensifier ("very a waste of time"); words take any.
    """
    rows = []
    for label, name in enumerate(LABEL_NAMES):
        k = n // 2 + (n % 2 if label == 1 else 0)
        pools = [(list(itertools.product(templates, words[name], SUBJECTS, INTENSIFIERS)), k)]
        if expressions:
            pools = [
                (pools[0][0], k // 2),
                (list(itertools.product(templates, expressions[name], SUBJECTS, ("",))), k - k // 2),
            ]
        for pool, count in pools:
            if count > len(pool):
                raise ValueError(
                    f"quickstart-sentiment: at most {2 * len(pool)} distinct sentences per split, asked {n}."
                )
            for template, word, subject, adverb in rng.sample(pool, count):
                rows.append({"text": template.format(subject=subject, adverb=adverb, word=word), "label": label})
    rng.shuffle(rows)
    return rows


def quickstart_sentiment(n_train: int = 64, n_eval: int = 200, seed: int = 0):
    """
    Build the quickstart task: binary sentiment of templated sentences with an unseen-word test split.

    Args:
        n_train (`int`, defaults to `64`):
            Number of training sentences (balanced), drawn from 6 templates x 16 sentiment words x 12 subjects x 6
            intensifiers. Little data on purpose. Must be >= 2.
        n_eval (`int`, defaults to `200`):
            Number of sentences in each test split (balanced). Must be >= 2.
        seed (`int`, defaults to `0`):
            Seed of the sampling; the word lists and templates are fixed.

    Returns:
        `datasets.DatasetDict` with the splits `train`, `in_distribution` (training words, unseen templates) and
        `held_out` (unseen templates *and* unseen sentiment words and expressions), each with a `text` column and a
        `label` column (`ClassLabel` with names `negative`, `positive`).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"quickstart-sentiment: `{name}` must be an integer >= 2, got {value!r}.")
    rng = random.Random(seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES))})
    splits = {
        "train": _sample(TRAIN_TEMPLATES, TRAIN_WORDS, n_train, rng),
        "in_distribution": _sample(TEST_TEMPLATES, TRAIN_WORDS, n_eval, rng),
        "held_out": _sample(TEST_TEMPLATES, HELD_OUT_WORDS, n_eval, rng, HELD_OUT_EXPRESSIONS),
    }
    return DatasetDict({name: Dataset.from_list(rows, features=features) for name, rows in splits.items()})
