"""Studies: experiments that train many runs and report on them (one command, resumable).

- [`run_multi_epoch_study`]: multi-epoch degradation and dropout at a fixed token budget ("To Repeat or Not To
  Repeat", arXiv:2305.13230); `regtune study multi-epoch RECIPE.yaml` or
  `python -m regtune.studies.multi_epoch RECIPE.yaml`.

The names are imported on first use, so that `python -m regtune.studies.multi_epoch` runs the module once.
"""

from __future__ import annotations

import importlib


_EXPORTS = {
    "StudyResults": ".multi_epoch",
    "add_multi_epoch_parser": ".multi_epoch",
    "plan_run": ".multi_epoch",
    "run_from_cli": ".multi_epoch",
    "run_multi_epoch_study": ".multi_epoch",
    "MultiEpochStudy": ".multi_epoch_recipe",
    "StudyRecipeError": ".multi_epoch_recipe",
    "load_study_recipe": ".multi_epoch_recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
