"""Label noise for the learning-with-noisy-labels evidence: one seeded noise model, and the built-in task using it.

[`corrupt_labels`] is the noise model (symmetric or asymmetric class-pair noise at a given rate). The built-in task
`noisy-labels` ([`noisy_labels_task`]) applies it to the training and validation splits of a small data set (the
validation split is noisy too: a user has no clean labels to choose hyper-parameters on) and keeps the test split
clean. Every split has a `true_label` column (what the [`NoisyLabelMonitor`] reads; the Trainer drops it from the
batches, so no regularizer sees it), and two more evaluation splits measure memorization at the end of training:
`noisy_train` (the mislabeled training examples with their given labels: accuracy = memorization) and
`noisy_train_true` (the same examples with their true labels: accuracy = early learning kept).
"""

from __future__ import annotations

import numpy as np


NOISE_KINDS = ("none", "symmetric", "asymmetric")
DATASETS = ("digits", "modular")

__all__ = ["DATASETS", "NOISE_KINDS", "corrupt_labels", "noisy_labels_task"]


def corrupt_labels(
    labels,
    num_classes: int,
    kind: str = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    pairs: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """
    The noise model of regtune's noisy-label evidence: corrupt a fraction `rate` of `labels`, seeded.

    - `"symmetric"`: a random `rate` fraction of the examples (exactly `round(rate * n)`) gets a label drawn uniformly
      from the *other* `num_classes - 1` classes, so `rate` is the fraction of wrong labels. (ELR's released CIFAR
      code draws from all classes, so its "40%" leaves 40% x 1/C of the chosen labels unchanged: its wrong fraction is
      `rate * (C - 1) / C`.)
    - `"asymmetric"`: class-pair noise, as in ELR's CIFAR code: within each class c that `pairs` maps, a random
      `rate` fraction of its examples (`round(rate * n_c)`) is relabeled `pairs[c]`. Default pairs: `c -> (c + 1) mod
      num_classes` for every class (ELR's CIFAR-100 rule, "the next class", applied to all classes).
    - `"none"`: no change.

    Args:
        labels (array-like of `int`): the true labels, in `[0, num_classes)`.
        num_classes (`int`): C, >= 2.
        kind (`str`, defaults to `"symmetric"`): one of `"none"`, `"symmetric"`, `"asymmetric"`.
        rate (`float`, defaults to `0.4`): the fraction to corrupt, in [0, 1].
        seed (`int`, defaults to `0`): the seed of a `numpy.random.Generator` (PCG64); the same seed gives the same
            noise on every machine.
        pairs (`dict[int, int]`, *optional*): with `"asymmetric"`, `{class: class it is flipped to}`.

    Returns:
        `(noisy_labels, is_noisy)`: int64 and bool arrays of the input's length; `is_noisy` marks the labels that
        differ from the true ones.
    """
    labels = np.asarray(labels, dtype=np.int64)
    errors = []
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
        errors.append(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
    if kind not in NOISE_KINDS:
        errors.append(f"`kind` must be one of {list(NOISE_KINDS)}, got {kind!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        errors.append(f"`rate` must be a number in [0, 1], got {rate!r}")
    if not errors and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        errors.append(
            f"`labels` must lie in [0, {num_classes - 1}] (`num_classes`={num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    if pairs is not None and not errors:
        bad = {k: v for k, v in pairs.items() if not (0 <= int(k) < num_classes and 0 <= int(v) < num_classes)}
        if bad or kind != "asymmetric":
            errors.append(
                f"`pairs` must map classes in [0, {num_classes - 1}] to classes in that range, with kind='asymmetric'"
                f"; got {pairs!r} with kind={kind!r}"
            )
    if errors:
        raise ValueError("corrupt_labels: " + "; ".join(errors) + ".")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if kind == "symmetric" and rate > 0:
        chosen = rng.permutation(len(labels))[: int(round(rate * len(labels)))]
        offsets = rng.integers(1, num_classes, size=len(chosen))
        noisy[chosen] = (labels[chosen] + offsets) % num_classes
    elif kind == "asymmetric" and rate > 0:
        mapping = {c: (c + 1) % num_classes for c in range(num_classes)} if pairs is None else dict(pairs)
        for source in sorted(mapping):
            members = np.flatnonzero(labels == source)
            chosen = rng.permutation(members)[: int(round(rate * len(members)))]
            noisy[chosen] = mapping[source]
    return noisy, noisy != labels


# --------------------------------------------------------------------------------------------------------------------
# The built-in task


def _digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    texts = [" ".join(str(int(v)) for v in row) for row in images]  # 64 intensities 0..16, one token each
    return texts, labels.astype(np.int64), 10


def _modular(p: int):
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    texts = [f"{x} {y}" for x, y in zip(a, b)]
    return texts, ((a + b) % p).astype(np.int64), p


def noisy_labels_task(
    dataset: str = "digits",
    noise: str = "symmetric",
    noise_rate: float = 0.4,
    n_train: int = 1000,
    n_val: int = 300,
    p: int = 97,
    seed: int = 0,
):
    """
    A classification data set with label noise on its training and validation splits (the `noisy-labels` built-in).

    Data sets (small enough for CPU runs, models trained from scratch):

    - `"digits"`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, bundled with scikit-learn), each
      image written as its 64 pixel intensities (`"0 0 5 13 9 ..."`, one token each with the MiniLM / BERT
      tokenizer);
    - `"modular"`: `(a + b) mod p` for all `p^2` pairs, written `"a b"` ("To grok or not to grok", Doshi et al.
      2023, corrupt a fraction of the training labels of such a task).

    The rows are shuffled with `seed`, then cut into `n_train` training, `n_val` validation and the rest test rows.
    The noise ([`corrupt_labels`], seeded with `seed`) is applied to the training and validation labels; test labels
    are clean.

    Args:
        dataset (`str`, defaults to `"digits"`): `"digits"` or `"modular"`.
        noise (`str`, defaults to `"symmetric"`): `"none"`, `"symmetric"` or `"asymmetric"` (see [`corrupt_labels`]).
        noise_rate (`float`, defaults to `0.4`): the fraction of corrupted training / validation labels, in [0, 1].
        n_train (`int`, defaults to `1000`), n_val (`int`, defaults to `300`): split sizes.
        p (`int`, defaults to `97`): the modulus of `"modular"`.
        seed (`int`, defaults to `0`): the split and the noise (the engine sets it to the run's seed).

    Returns:
        `datasets.DatasetDict` with `train`, `validation`, `test`, `noisy_train` and `noisy_train_true`; columns
        `text`, `label` (given, a `ClassLabel`) and `true_label`.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if dataset not in DATASETS:
        raise ValueError(f"noisy-labels: `dataset` must be one of {list(DATASETS)}, got {dataset!r}.")
    texts, labels, num_classes = _digits() if dataset == "digits" else _modular(int(p))
    n = len(labels)
    if n_train + n_val >= n:
        raise ValueError(
            f"noisy-labels: `n_train` + `n_val` ({n_train} + {n_val}) must leave test rows of the {n} examples of "
            f"{dataset!r}."
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    given = {}
    for offset, split in enumerate(("train", "validation")):
        given[split], _ = corrupt_labels(labels[parts[split]], num_classes, noise, noise_rate, seed=seed * 2 + offset)
    given["test"] = labels[parts["test"]]
    features = Features({"text": Value("string"), "label": ClassLabel(num_classes), "true_label": Value("int64")})

    def make(rows, given_labels):
        return Dataset.from_dict(
            {
                "text": [texts[i] for i in rows],
                "label": [int(v) for v in given_labels],
                "true_label": [int(labels[i]) for i in rows],
            },
            features=features,
        )

    splits = {split: make(parts[split], given[split]) for split in ("train", "validation", "test")}
    wrong = np.flatnonzero(given["train"] != labels[parts["train"]])
    splits["noisy_train"] = make(parts["train"][wrong], given["train"][wrong])
    splits["noisy_train_true"] = make(parts["train"][wrong], labels[parts["train"]][wrong])
    return DatasetDict(splits)
