"""The text data sets every bench reads (under `REGTUNE_DATA_DIR`, default /work/shared/data), as lists of
`(text, label index)`. Each bench keeps its own protocol (label order, splits); only the file readers are shared."""

from __future__ import annotations

import os

from bench._common import DATA_DIR
from regtune.data.fewshot_text import (  # the readers are regtune's (the recipes' few-shot / base-to-novel tasks)
    AG_NEWS_LABELS,
    SST2_LABELS,
    TREC_LABELS,
    per_class_sample,
    read_ag_news,
    read_mr,
    read_sst2,
    read_trec,
)


__all__ = [
    "AG_NEWS_LABELS",
    "DATA_DIR",
    "SST2_LABELS",
    "TREC_LABELS",
    "data_path",
    "per_class_sample",
    "read_ag_news",
    "read_mr",
    "read_sst2",
    "read_trec",
]


def data_path(*parts: str, data_dir: str = DATA_DIR) -> str:
    return os.path.join(data_dir, *parts)
