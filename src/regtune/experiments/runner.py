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
import dataclasses
import gc
import hashlib
import inspect
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable

from .build import (
    apply_adapter,
    build_trainer,
    count_parameters,
    hub_base_model,
    load_data,
    load_metrics,
    load_model,
    load_tokenizer,
    takes_raw_data,
    tokenize_data,
)
from .errors import RecipeError
from .finetune import (
    BUILTIN_METRICS,
    EvaluationSpec,
    Recipe,
    RunSpec,
    metric_name,
    resolve_trainer,
    set_path,
    validate_run,
)
from .io import (
    RecipeProgress,
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
from .launch import distributed_training_defaults
from .report import (
    ExperimentResult,
    format_seeded_report,
    format_table,
    plot_comparisons,
    plot_results,
    summarize_seeds,
    write_results,
)


def _model_dir_name(run: RunSpec) -> str:
    return "adapter" if run.adapter is not None else "model"


def run_one(run: RunSpec, run_dir: str, cache: dict | None = None) -> dict:
    """Train and evaluate one run; save its model and results in `run_dir`. Returns its results dict."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    import regtune

    cache = {} if cache is None else cache
    names = [metric_name(m) for m in run.evaluation.metrics or []]
    if any(("metric", n) not in cache for n in names if n not in BUILTIN_METRICS):
        cache.update({("metric", n): m for n, m in load_metrics(run).items()})  # before anything is trained
    metric_modules = {n: cache[("metric", n)] for n in names if ("metric", n) in cache}
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
        model = load_model(
            run.model, run.task, data.label_names, tokenizer, data.class_descriptions, run.data.max_length
        )
    with _as_recipe_error("adapter", run, fields=run.adapter.kwargs if run.adapter else None):
        model = apply_adapter(model, run)
    trainable, total = count_parameters(model)

    _, config_cls = resolve_trainer(run.trainer)
    training = distributed_training_defaults(dict(run.training))  # torchrun on CPUs: one data-parallel job
    training.setdefault("seed", run.seed)
    if "dataloader_pin_memory" not in training and not has_accelerator():
        training["dataloader_pin_memory"] = False  # pinning needs an accelerator (else a warning per dataloader)
    args = config_cls(output_dir=os.path.join(run_dir, "checkpoints"), **training)
    eval_dataset = {name: tokenized[split] for name, split in data.eval_splits.items()} or None
    trainer = build_trainer(
        run, model, args, tokenized[data.train_split], eval_dataset, tokenizer, run.task, metric_modules
    )

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
    metric_keys = getattr(trainer.compute_metrics, "keys", set())  # the result keys of the evaluate metrics
    if eval_dataset and (final is None or (metric_modules and not metric_keys)):
        final = trainer.evaluate()
    kept = ("loss", *BUILTIN_METRICS, *metric_keys)
    metrics = {}
    for name in data.eval_splits:
        prefix = f"eval_{name}_"
        split_metrics = {k[len(prefix) :]: v for k, v in final.items() if k.startswith(prefix)}
        split_metrics = {k: v for k, v in split_metrics.items() if k in kept}
        if run.task == "causal-lm" and "loss" in split_metrics:
            split_metrics["perplexity"] = math.exp(min(split_metrics["loss"], 50.0))
        metrics[name] = split_metrics
    if data.summarize is not None:  # derived metrics (e.g. H, the harmonic mean of base and novel accuracy)
        metrics.update(data.summarize({data.eval_splits[name]: m for name, m in metrics.items()}))

    result = {
        "run": run.name,
        "seed": run.seed,
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
        "diagnostics": logged_diagnostics(trainer.state.log_history),
        "diagnostics_last": logged_diagnostics(trainer.state.log_history, last=True),
        "regtune_version": regtune.__version__,
        "history": [dict(h) for h in trainer.state.log_history],
    }
    trainer.save_model(os.path.join(run_dir, _model_dir_name(run)))
    if trainer.is_world_process_zero():
        write_atomic(os.path.join(run_dir, "metrics.json"), result)  # the run is finished once this exists
    del trainer, model
    gc.collect()
    return result


def logged_diagnostics(history: list[dict], last: bool = False) -> dict[str, float]:
    """
    The mean over the logged training steps (with `last`: the last logged value) of every mechanism diagnostic the
    trainer logged (the keys `<regularizer>/<name>` that regtune's trainers add to the training logs, e.g.
    `glad/cos_g_gsam`).
    """
    values: dict[str, list[float]] = {}
    for entry in history:
        if "loss" not in entry:
            continue
        for key, value in entry.items():
            if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    return {key: v[-1] if last else sum(v) / len(v) for key, v in values.items()}


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
        changed = _changed_settings(run_dir, run)
        if changed is None:
            states[run.name] = "new"
        elif not changed:
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


def _settings(run: dict, ignored=("description",)) -> dict:
    return plain({k: v for k, v in run.items() if k not in ignored})


def _changed_settings(run_dir: str, run: RunSpec, ignored=("description",)) -> list[str] | None:
    """The fields where the settings stored in `<run_dir>/recipe.yaml` differ from `run`'s; `None` when none are."""
    stored_path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(stored_path):
        return None
    with open(stored_path, encoding="utf-8") as f:
        stored = load_yaml(f.read()) or {}
    return changed_fields(_settings(stored, ignored), _settings(run.to_dict(), ignored))


def _write_run_recipe(run_dir: str, run: RunSpec) -> None:
    write_atomic(os.path.join(run_dir, "recipe.yaml"), dump_yaml(run.to_dict()))


def _read_results(recipe: Recipe, subfolders=("",)) -> list[dict]:
    """
    The results on disk (`<run>/<subfolder>/metrics.json`) of every run of the full recipe (`recipe.raw`), in recipe
    order, so that runs not selected now keep their place in the report.
    """
    runs = recipe.raw.get("runs")
    names = [r.name for r in recipe.runs]
    if isinstance(runs, list):
        names = [r["name"] for r in runs if isinstance(r, dict) and isinstance(r.get("name"), str)]
    paths = [os.path.join(recipe.output_dir, name, sub, "metrics.json") for name in names for sub in subfolders]
    return [read_json(path) for path in paths if os.path.isfile(path)]


def _write_report(recipe: Recipe, results: list[dict], table: str, plots: dict, ran, skipped, **extra):
    """Write the results files (main process only) and return the [`ExperimentResult`]."""
    files = {}
    if is_main_process():
        version = results[0]["regtune_version"] if results else None
        files = write_results(recipe.output_dir, recipe.name, results, table, plots, regtune_version=version, **extra)
        files["recipe"] = os.path.join(recipe.output_dir, "recipe.yaml")
    return ExperimentResult(recipe.output_dir, results, table, files, ran, skipped)


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
    if recipe.seeds is not None:
        return run_seeded(recipe, log=log, overwrite=overwrite, report_only=report_only)
    output_dir = recipe.output_dir
    states = {run.name: "report" for run in recipe.runs} if report_only else check_resumable(recipe, overwrite)
    main = is_main_process()
    if main:
        write_atomic(os.path.join(output_dir, "recipe.yaml"), dump_yaml(recipe.raw))
    barrier()
    cache: dict = {}
    ran, skipped = [], []
    progress = RecipeProgress(sum(states[run.name] != "report" for run in recipe.runs), log, "runs")
    for i, run in enumerate(recipe.runs, 1):
        run_dir = os.path.join(output_dir, run.name)
        if states[run.name] == "report":  # `report_only`: train nothing, rewrite the table from the results
            continue
        if states[run.name] == "finished":
            skipped.append(run.name)
            progress.skip()
            if main:
                log(f"[regtune] run {i}/{len(recipe.runs)}: {run.name} finished earlier with the same settings")
            continue
        if main:
            log(
                f"[regtune] run {i}/{len(recipe.runs)}: {run.name} ({run.method}){' resumed' * (states[run.name] == 'resume')}"
            )
            if states[run.name] == "overwrite":
                shutil.rmtree(run_dir)
            _write_run_recipe(run_dir, run)
        barrier()
        start = time.perf_counter()
        run_one(run, run_dir, cache)
        progress.finished(time.perf_counter() - start)
        ran.append(run.name)

    results = _read_results(recipe)
    plots = {"results": lambda path: plot_results(results, path, title=recipe.name)}
    return _write_report(recipe, results, format_table(results), plots, ran, skipped)


# --------------------------------------------------------------------------------------------------------------------
# Paired seeds, sweeps chosen on a validation split, paired comparisons


def with_seed(run: RunSpec, seed: int, evaluation: EvaluationSpec | None = None) -> RunSpec:
    """
    `run` at `seed`: the model's seed (new heads, adapter initialization), `training.seed` (data order, dropout) and,
    for a built-in task that takes one, its `seed` option (the few-shot sample); optionally other `evaluation`.
    """
    from regtune.data import get_task

    data = run.data
    if data.builtin is not None and "seed" in inspect.signature(get_task(data.builtin).build).parameters:
        data = data.model_copy(update={"options": {**data.options, "seed": seed}})
    return dataclasses.replace(
        run, seed=seed, data=data, training={**run.training, "seed": seed}, evaluation=evaluation or run.evaluation,
        sweep={}, variants=[], match=None, values_from=None,
    )  # fmt: skip


def settings_key(run: RunSpec) -> str:
    """A short hash of a run's settings (its name and description left out): equal settings, equal key."""
    settings = _settings(run.to_dict(), ("description", "name"))
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _stored_state(spec: RunSpec, run_dir: str, overwrite: bool) -> str:
    """
    `"finished"`, `"resume"` or `"new"` for the folder `run_dir` of `spec`. A folder holding other settings raises
    [`RecipeError`] naming the changed fields, or, with `overwrite`, is removed (`"new"`).
    """
    changed = _changed_settings(run_dir, spec, ("description", "name"))
    if changed is None:
        return "new"
    if changed and not overwrite:
        raise RecipeError(
            [(f"runs.{spec.name}", f"{run_dir} holds this run with other settings ({'; '.join(changed[:8])}). Pass "
              "--overwrite to train it again, or use another output_dir.")]
        )  # fmt: skip
    if changed:
        if is_main_process():
            shutil.rmtree(run_dir)
        barrier()
        return "new"
    return "finished" if os.path.isfile(os.path.join(run_dir, "metrics.json")) else "resume"


def _train_or_read(
    spec: RunSpec, run_dir: str, cache: dict, overwrite: bool, train: bool, log, label: str, progress=None
):
    """`(results, trained now)` of `spec` in `run_dir`: read when finished with the same settings, else trained."""
    if _stored_state(spec, run_dir, overwrite) == "finished":
        if progress is not None:
            progress.skip()
        return read_json(os.path.join(run_dir, "metrics.json")), False
    if not train:
        return None, False
    if is_main_process():
        log(f"[regtune] {label}")
        _write_run_recipe(run_dir, spec)
    barrier()
    start = time.perf_counter()
    result = run_one(spec, run_dir, cache)
    if progress is not None:
        progress.finished(time.perf_counter() - start)
    return result, True


def run_seeded(recipe: Recipe, log=print, overwrite: bool = False, report_only: bool = False) -> ExperimentResult:
    """
    Run a recipe with `seeds:`. First, each run with a `sweep` trains every value on the `select.seeds` and scores
    it on `select.split` (mean over those seeds; the best metric wins, ties to the lower loss; `select.match` /
    `select.values_from` take another run's choice into account). Then every run, at its chosen values, trains once
    per test seed, seed-major, in `<output_dir>/<run>/seed-<seed>/`. Finally the results (per-run means with 95%
    t-intervals, the sweep tables, the paired comparisons and the diagnostics) are written to `output_dir`.

    Resumable: sweep trials live in `<output_dir>/select/<settings hash>/` (runs with equal settings share them) and
    a finished (run, seed) is read back, not trained; a (run, seed) folder holding other settings is refused unless
    `overwrite`. Two runs that resolve to the same settings train once per seed (the second is a copy).
    """
    output_dir = recipe.output_dir
    main = is_main_process()
    train = not report_only
    if main and train:
        write_atomic(os.path.join(output_dir, "recipe.yaml"), dump_yaml(recipe.raw))
    by_name = {r.name: r for r in recipe.all_runs or recipe.runs}
    wanted = set(by_name) if report_only else {r.name for r in recipe.runs}
    for run in list(recipe.runs):  # the runs whose choice a selected run takes
        wanted |= {n for n in (run.match, run.values_from) if n}
    select = recipe.selection
    cache: dict = {}
    ran, skipped = [], []
    trials = sum(len(r.variants) * len(select.seeds) for r in by_name.values() if r.name in wanted and r.variants)
    finals = sum(r.name in wanted for r in recipe.runs) * len(recipe.seeds)
    progress = RecipeProgress(trials + finals, log) if train else None

    # 1. the sweeps, on the selection seeds and the validation split
    sweeps: dict[str, dict] = {}
    chosen: dict[str, RunSpec] = {}
    order = sorted((r for r in by_name.values() if r.name in wanted), key=lambda r: bool(r.match or r.values_from))
    for run in order:
        if run.values_from:
            values = sweeps.get(run.values_from, {}).get("chosen")
            if values is not None:
                raw = run.to_dict()
                for key, value in values.items():
                    raw = set_path(raw, key, value)
                chosen[run.name] = validate_run(raw)
                sweeps[run.name] = {"rule": f"values_from {run.values_from}", "chosen": values, "rows": []}
            continue
        if not run.variants:
            chosen[run.name] = run
            continue
        rows = []
        for values, variant in run.variants:
            evaluation = EvaluationSpec(  # (a variant's own metrics: a sweep may change their args)
                splits=[select.split],
                metrics=[select.metric] if select.metric in BUILTIN_METRICS else variant.evaluation.metrics,
            )
            row = {"values": values, "seeds": [], "metric": [], "loss": []}
            for seed in select.seeds:
                spec = with_seed(variant, seed, evaluation)
                trial_dir = os.path.join(output_dir, "select", settings_key(spec))
                label = f"select {run.name} {values} seed {seed}"
                result, _ = _train_or_read(spec, trial_dir, cache, overwrite, train, log, label, progress)
                if result is None:
                    continue
                scores = result["metrics"].get(select.split, {})
                if select.metric not in scores:
                    raise RecipeError(
                        [("select.metric", f"run {run.name!r}: no result {select.metric!r} on {select.split}; its "
                          f"metrics gave {', '.join(scores) or 'nothing'}")]
                    )  # fmt: skip
                row["seeds"].append(seed)
                row["metric"].append(scores.get(select.metric, float("nan")))
                row["loss"].append(scores.get("loss", float("nan")))
            if row["seeds"]:
                row["mean_metric"] = statistics.fmean(row["metric"])
                row["mean_loss"] = statistics.fmean(row["loss"])
            rows.append(row)
        scored = [i for i, row in enumerate(rows) if "mean_metric" in row]
        if not scored:
            continue
        sign = 1.0 if select.mode != "min" else -1.0  # (mode defaults to min for loss and perplexity, else max)
        rule = "best"
        if run.match and "target" in sweeps.get(run.match, {}):
            target = sweeps[run.match]["target"]
            best = min(scored, key=lambda i: (abs(rows[i]["mean_metric"] - target), rows[i]["mean_loss"]))
            rule = f"match {run.match} ({select.metric} {target:.4f})"
        else:
            best = max(scored, key=lambda i: (round(sign * rows[i]["mean_metric"], 6), -rows[i]["mean_loss"]))
        sweeps[run.name] = {
            "rule": rule,
            "chosen": rows[best]["values"],
            "target": rows[best]["mean_metric"],
            "rows": rows,
        }
        chosen[run.name] = run.variants[best][1]
        if main:
            log(f"[regtune] {run.name}: chose {rows[best]['values']} ({rule})")

    # 2. every selected run, at its chosen values, once per test seed (seed-major: a cut-short run keeps its pairs)
    names = [r.name for r in recipe.runs if r.name in chosen]
    for seed in recipe.seeds:
        done: dict[str, tuple[str, dict]] = {}
        for name in names:
            spec = with_seed(chosen[name], seed)
            run_dir = os.path.join(output_dir, name, f"seed-{seed}")
            key = settings_key(spec)
            if key in done and train and _stored_state(spec, run_dir, overwrite) != "finished":
                same, result = done[key]  # the same settings as another run: one training, two names
                if progress is not None:
                    progress.skip()
                if main:
                    _write_run_recipe(run_dir, spec)
                    write_atomic(os.path.join(run_dir, "metrics.json"), {**result, "run": name, "same_as": same})
                continue
            label = f"run {name} ({spec.method}) seed {seed}"
            result, trained = _train_or_read(spec, run_dir, cache, overwrite, train, log, label, progress)
            if result is not None:
                done.setdefault(key, (name, result))
                (ran if trained else skipped).append(f"{name}/seed-{seed}")

    # 3. the report, from the files on disk (runs not selected now keep their results)
    results = _read_results(recipe, [f"seed-{seed}" for seed in recipe.seeds])
    summary = summarize_seeds(results, recipe.compare)
    summary["sweeps"] = sweeps
    plots = {
        "results": lambda path: plot_results(summary["runs"], path, title=recipe.name),
        "comparison": lambda path: plot_comparisons(summary["comparisons"], path, title=recipe.name),
    }
    select = recipe.selection.model_dump() if recipe.selection else None
    table = format_seeded_report(summary, recipe.selection)
    return _write_report(recipe, results, table, plots, ran, skipped, seeds=recipe.seeds, select=select, **summary)
