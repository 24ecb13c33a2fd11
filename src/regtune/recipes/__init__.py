"""Recipes: one validated YAML = model + data + adapter + regularizers + training arguments + evaluation.

```python
from regtune.recipes import load_recipe, run_recipe

recipe = load_recipe("recipes/quickstart.yaml", {"training.num_train_epochs": 1})
result = run_recipe(recipe)
print(result.table)
```

The command line does the same: `regtune run recipes/quickstart.yaml --training.num_train_epochs=1`.
"""

from __future__ import annotations

from .builder import BUILTIN_MODELS, resolve_model_path
from .loader import apply_overrides, load_recipe, parse_override_args
from .report import format_table, plot_results
from .runner import RecipeResult, run_one, run_recipe
from .schema import (
    AdapterSpec,
    DataSpec,
    EvaluationSpec,
    ModelSpec,
    Recipe,
    RegularizerSpec,
    RunSpec,
    adapter_types,
    merge_run,
    resolve_trainer,
    validate_recipe,
    validate_run,
)
from .validation import RecipeError, dump_yaml, load_yaml


__all__ = [
    "BUILTIN_MODELS",
    "AdapterSpec",
    "DataSpec",
    "EvaluationSpec",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "RegularizerSpec",
    "RunSpec",
    "adapter_types",
    "apply_overrides",
    "dump_yaml",
    "format_table",
    "load_recipe",
    "load_yaml",
    "merge_run",
    "parse_override_args",
    "plot_results",
    "resolve_model_path",
    "resolve_trainer",
    "run_one",
    "run_recipe",
    "validate_recipe",
    "validate_run",
]
