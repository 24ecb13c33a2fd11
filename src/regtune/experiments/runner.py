"""Run a validated recipe: every run trains with the Trainer, then the results go to the run folder.

```
<output_dir>/                   # the recipe's output_dir (default runs/<recipe name>)
    recipe.yaml                 # the recipe as run (overrides applied)
    results.json                # every run's results (the one results format of every kind)
    results.md                  # the comparison table
    results.png                 # the comparison plot
    <run name>/
        adapter/                # trainer.save_model: adapter_config.json, adapter_model.safetensors, tokenizer
                                # (model/ for full fine-tuning)
        recipe.yaml             # this run as a standalone recipe (no runs:)
        metrics.json            # its results and its log history
        checkpoints/            # the Trainer's output_dir
```

Under `accelerate launch` every process runs this; only the main process writes the summary files.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import time
from collections.abc import Callable

from .build import (
    apply_adapter,
    build_trainer,
    count_parameters,
    hub_base_model,
    load_data,
    load_model,
    load_tokenizer,
    takes_raw_data,
    tokenize_data,
)
from .errors import RecipeError
from .finetune import Recipe, RunSpec, resolve_trainer
from .io import (
    barrier,
    changed_fields,
    dump_yaml,
    has_accelerator,
    is_main_process,
    load_yaml,
    plain,
    read_json,
    write_atomic,
)
from .report import ExperimentResult, format_table, plot_results, write_results


def _model_dir_name(run: RunSpec) -> str:
    return "adapter" if run.adapter is not None else "model"


def run_one(run: RunSpec, run_dir: str, cache: dict | None = None) -> dict:
    """Train and evaluate one run; save its model and results in `run_dir`. Returns its results dict."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    import regtune

    cache = {} if cache is None else cache
    tokenizer_key = ("tokenizer", run.model.tokenizer or run.model.name_or_path, run.model.revision)
    if tokenizer_key not in cache:
        key = "tokenizer" if run.model.tokenizer else "name_or_path"
        with _as_recipe_error(f"model.{key}", run, loading=getattr(run.model, key)):
            cache[tokenizer_key] = load_tokenizer(run.model, run.task)
    tokenizer = cache[tokenizer_key]
    sft = takes_raw_data(run)
    data_key = ("data", repr(run.data), repr(run.evaluation), tokenizer_key, run.task, sft)
    if data_key not in cache:
        with _as_recipe_error("data.path" if run.data.path else "data", run, loading=run.data.path):
            data = load_data(run.data, run.task, run.evaluation, raw_format=sft)
        # trl's SFT trainers (LfUTrainer, SFTTrainer) tokenize their own formats; the others get token ids
        tokenized = data.splits if sft else tokenize_data(data, tokenizer, run.task, run.data.max_length)
        cache[data_key] = (data, tokenized)
    data, tokenized = cache[data_key]

    set_seed(run.seed)
    with _as_recipe_error(
        "model.name_or_path" if run.model.name_or_path else "model.config", run, run.model.name_or_path
    ):
        model = load_model(run.model, run.task, data.label_names, tokenizer)
    with _as_recipe_error("adapter", run, fields=run.adapter.kwargs if run.adapter else None):
        model = apply_adapter(model, run)
    trainable, total = count_parameters(model)

    _, config_cls = resolve_trainer(run.trainer)
    training = dict(run.training)
    training.setdefault("seed", run.seed)
    if "dataloader_pin_memory" not in training and not has_accelerator():
        training["dataloader_pin_memory"] = False  # pinning needs an accelerator (else a warning per dataloader)
    args = config_cls(output_dir=os.path.join(run_dir, "checkpoints"), **training)
    eval_dataset = {name: tokenized[split] for name, split in data.eval_splits.items()} or None
    trainer = build_trainer(run, model, args, tokenized[data.train_split], eval_dataset, tokenizer, run.task)

    start = time.perf_counter()
    checkpoints = os.path.join(run_dir, "checkpoints")
    last = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
    train_output = trainer.train(resume_from_checkpoint=last)  # a killed run continues from its last checkpoint
    # training time without the evaluations run during training (they are logged with their own runtime)
    eval_seconds = sum(
        v for h in trainer.state.log_history for k, v in h.items() if k.endswith("_runtime") and k.startswith("eval_")
    )
    train_seconds = time.perf_counter() - start - eval_seconds

    final = _reusable_final_eval(trainer, list(data.eval_splits)) if eval_dataset else {}
    if eval_dataset and final is None:
        final = trainer.evaluate()
    metrics = {}
    for name in data.eval_splits:
        prefix = f"eval_{name}_"
        split_metrics = {k[len(prefix) :]: v for k, v in final.items() if k.startswith(prefix)}
        split_metrics = {k: v for k, v in split_metrics.items() if k in ("loss", "accuracy", "macro_f1")}
        if run.task == "causal-lm" and "loss" in split_metrics:
            split_metrics["perplexity"] = math.exp(min(split_metrics["loss"], 50.0))
        metrics[name] = split_metrics

    result = {
        "run": run.name,
        "method": run.method,
        "adapter_type": run.adapter.type if run.adapter is not None else None,
        "task": run.task,
        "base_model": hub_base_model(run.model) or run.model.name_or_path,
        "label_names": data.label_names,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 2),  # trainer.train() wall time minus its evaluations
        "train_loss": train_output.metrics.get("train_loss"),
        "global_step": trainer.state.global_step,
        "metrics": metrics,
        "regtune_version": regtune.__version__,
        "history": [dict(h) for h in trainer.state.log_history],
    }
    trainer.save_model(os.path.join(run_dir, _model_dir_name(run)))
    if trainer.is_world_process_zero():
        write_atomic(os.path.join(run_dir, "metrics.json"), result)  # the run is finished once this exists
    del trainer, model
    gc.collect()
    return result


@contextlib.contextmanager
def _as_recipe_error(path: str, run: RunSpec, loading: str | None = None, fields: dict | None = None):
    """
    Report a failure to load what a section names (a missing model, target modules that match nothing, ...) as a
    [`RecipeError`] under the section's key path (or those of the `fields` its message names), not a traceback.
    """
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, RecipeError):
            raise
        from .checks import fields_named

        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        named = fields_named(text, fields or {})
        given = ", ".join(f"{name}={fields[name]!r}" for name in named)
        prefix = f"run {run.name!r}: " + (f"cannot load {loading!r}: " if loading else f"{given}: " if given else "")
        raise RecipeError([(f"{path}.{n}" if named else path, prefix + text) for n in named or [""]]) from e


def _reusable_final_eval(trainer, names: list[str]) -> dict | None:
    """The evaluation logged at the last step (all splits), unless the Trainer reloaded a best checkpoint."""
    if trainer.args.load_best_model_at_end:
        return None
    merged = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == trainer.state.global_step:
            merged.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    if all(f"eval_{name}_loss" in merged for name in names):
        return merged
    return None


def check_resumable(recipe: Recipe, overwrite: bool = False) -> dict[str, str]:
    """
    The state of each selected run's folder: `"new"`, `"resume"` (started with the same settings, not finished),
    `"finished"` or, with `overwrite`, `"overwrite"` (its settings changed: it starts again). Without `overwrite`, a
    run whose stored settings (`<run>/recipe.yaml`) differ from the recipe's raises [`RecipeError`] naming every
    changed field, before anything is trained: old and new results are never mixed.
    """
    states, errors = {}, []
    for run in recipe.runs:
        run_dir = os.path.join(recipe.output_dir, run.name)
        stored_path = os.path.join(run_dir, "recipe.yaml")
        if not os.path.isfile(stored_path):
            states[run.name] = "new"
            continue
        with open(stored_path, encoding="utf-8") as f:
            stored = load_yaml(f.read()) or {}
        changed = changed_fields(_settings(stored), _settings(run.to_dict()))
        if not changed:
            finished = os.path.isfile(os.path.join(run_dir, "metrics.json"))
            states[run.name] = "finished" if finished else "resume"
        elif overwrite:
            states[run.name] = "overwrite"
        else:
            shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            errors.append(
                (
                    f"runs.{run.name}",
                    f"{run_dir} holds this run with other settings ({shown}). Pass --overwrite "
                    "to train it again, or use another output_dir.",
                )  # fmt: skip
            )
    if errors:
        raise RecipeError(errors, recipe.source)
    return states


def _settings(run: dict) -> dict:
    return plain({k: v for k, v in run.items() if k not in ("description",)})


def run_recipe(
    recipe: Recipe, log: Callable[[str], None] = print, overwrite: bool = False, report_only: bool = False
) -> ExperimentResult:
    """
    Run every run of `recipe` in order, then write the comparison (table, plot, metrics) to `recipe.output_dir`.

    Resumable: a run finished with the same settings is not trained again, an unfinished one continues from its
    last checkpoint (`<run>/checkpoints`), and a run whose settings changed is refused (see [`check_resumable`])
    unless `overwrite`. Runs of the recipe that are not selected (see [`Recipe.select`]) but have results from an
    earlier invocation are included in the comparison, so one run can be re-done alone. With `report_only`,
    nothing is trained: the comparison is rewritten from the results on disk.
    """
    output_dir = recipe.output_dir
    states = {run.name: "report" for run in recipe.runs} if report_only else check_resumable(recipe, overwrite)
    main = is_main_process()
    if main:
        write_atomic(os.path.join(output_dir, "recipe.yaml"), dump_yaml(recipe.raw))
    barrier()
    cache: dict = {}
    ran, skipped = [], []
    for i, run in enumerate(recipe.runs, 1):
        run_dir = os.path.join(output_dir, run.name)
        if states[run.name] == "report":  # `report_only`: train nothing, rewrite the table from the results
            continue
        if states[run.name] == "finished":
            skipped.append(run.name)
            if main:
                log(f"[regtune] run {i}/{len(recipe.runs)}: {run.name} finished earlier with the same settings")
            continue
        if main:
            log(
                f"[regtune] run {i}/{len(recipe.runs)}: {run.name} ({run.method}){' resumed' * (states[run.name] == 'resume')}"
            )
            if states[run.name] == "overwrite":
                shutil.rmtree(run_dir)
            write_atomic(os.path.join(run_dir, "recipe.yaml"), dump_yaml(run.to_dict()))
        barrier()
        run_one(run, run_dir, cache)
        ran.append(run.name)

    results = []
    for name in _run_names_in_order(recipe):
        path = os.path.join(output_dir, name, "metrics.json")
        if os.path.isfile(path):
            results.append(read_json(path))
    table = format_table(results)
    files = {}
    if main:
        version = results[0]["regtune_version"] if results else None
        plots = {"results": lambda path: plot_results(results, path, title=recipe.name)}
        files = write_results(output_dir, recipe.name, results, table, plots, regtune_version=version)
        files["recipe"] = os.path.join(output_dir, "recipe.yaml")
    return ExperimentResult(output_dir, results, table, files, ran, skipped)


def _run_names_in_order(recipe: Recipe) -> list[str]:
    """All run names of the full recipe (`recipe.raw`), so that unselected runs keep their place in the table."""
    runs = recipe.raw.get("runs")
    if isinstance(runs, list):
        return [r["name"] for r in runs if isinstance(r, dict) and isinstance(r.get("name"), str)]
    return [r.name for r in recipe.runs]
