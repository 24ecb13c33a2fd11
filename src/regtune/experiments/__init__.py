"""The experiment engine: every experiment is one recipe `kind`, read by one loader and run by [`run_recipe`].

- `runs` (the default): fine-tuning runs, model + data + adapter + regularizers + training arguments
  ([`~regtune.experiments.finetune`]);
- `token-budget`: causal LMs trained from scratch at a fixed token budget, repetitions x dropout (the multi-epoch
  study, [`~regtune.experiments.token_budget`]);
- `gardo`: GARDO and its baselines on the offline diffusion-RL testbed ([`~regtune.experiments.gardo`]).

```python
from regtune.experiments import load_recipe, run_recipe

recipe = load_recipe("recipes/quickstart.yaml", [("training.num_train_epochs", 1)])
result = run_recipe(recipe)                # resumable; overwrite=True starts runs whose settings changed again
print(result.table)
```

The command line does the same: `regtune run recipes/quickstart.yaml --training.num_train_epochs=1`.
"""

from __future__ import annotations

import dataclasses

from .errors import RecipeError
from .io import dump_yaml, load_yaml
from .recipe import KINDS, apply_overrides, load_recipe, parse_override_args, read_recipe
from .report import ExperimentResult


def run_recipe(recipe, **options) -> ExperimentResult:
    """
    Run a recipe returned by [`load_recipe`], whatever its kind, and write its results (JSON, markdown table, plot)
    into its `output_dir`. Options: `overwrite` (start runs whose stored settings differ from the recipe's again),
    `report_only` (train nothing; rewrite the report), `output_dir`, `only` (method names, for `gardo`).
    """
    only, output_dir = options.pop("only", None), options.pop("output_dir", None)
    if recipe.kind == "runs":
        from .runner import run_recipe as run

        recipe = recipe.select(only) if only else recipe
        recipe = dataclasses.replace(recipe, output_dir=output_dir) if output_dir else recipe
        return run(recipe, **options)
    if only and recipe.kind != "gardo":
        raise RecipeError([("--only", f"a {recipe.kind} recipe runs all its runs (no --only)")], recipe.source)
    if recipe.kind == "token-budget":
        from .token_budget import run_multi_epoch_study as run
    else:
        from .gardo import run_gardo_study as run
    return run(recipe, output_dir=output_dir, **({"only": only} if only else {}), **options)


__all__ = [
    "KINDS",
    "ExperimentResult",
    "RecipeError",
    "apply_overrides",
    "dump_yaml",
    "load_recipe",
    "load_yaml",
    "parse_override_args",
    "read_recipe",
    "run_recipe",
]
