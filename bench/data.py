"""The text data sets every bench reads (under `REGTUNE_DATA_DIR`, default /work/shared/data), as lists of
`(text, label index)`. Each bench keeps its own protocol (label order, splits); only the file readers are shared."""

from __future__ import annotations

import csv
import os
import random

from bench._common import DATA_DIR


# canonical label orders (TREC: the coarse-label order of the HF `trec` dataset; AG News: classes.txt order)
TREC_LABELS = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SST2_LABELS = ["negative", "positive"]


def read_trec(path: str, labels: list[str]) -> list[tuple[str, int]]:
    """TREC's `LABEL:fine text` lines (latin-1: train_5500.label is not valid UTF-8); labels index `labels`."""
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if line:
                tag, text = line.split(" ", 1)
                out.append((text, labels.index(tag.split(":", 1)[0])))
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


def data_path(*parts: str, data_dir: str = DATA_DIR) -> str:
    return os.path.join(data_dir, *parts)


def per_class_sample(rows: list[tuple[str, int]], n_classes: int, n: int, seed: int) -> list[int]:
    """Indices of a seeded sample of at most `n` rows of every class (all of a class's rows when it has fewer)."""
    rng = random.Random(seed)
    keep = []
    for c in range(n_classes):
        ids = [i for i, (_, y) in enumerate(rows) if y == c]
        keep += ids if len(ids) <= n else rng.sample(ids, n)
    return sorted(keep)
