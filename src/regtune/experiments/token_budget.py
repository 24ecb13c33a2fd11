"""The `token-budget` kind: multi-epoch degradation and dropout ("To Repeat or Not To Repeat", arXiv:2305.13230).

Train a causal LM from scratch at a fixed token budget while varying how often a unique subset of the data is repeated
(`repetitions` epochs over `budget / repetitions` unique tokens, nested random samples of blocks of the training text),
the dropout setting and the seed; evaluate every run on held-out text; write tables (seed means with 95% intervals,
paired differences) and plots. Every finished run is saved at once (`results/<run>.json`, atomically), so a killed
study continues where it stopped. Under `accelerate launch` every process runs the same loop and the Trainer
distributes each run.

```
regtune run recipes/multi_epoch.yaml [--budget.tokens=262144] [--report_only]
accelerate launch -m regtune run recipes/multi_epoch_gpu.yaml
```

```py
>>> from regtune.experiments import load_recipe, run_recipe
>>> result = run_recipe(load_recipe("recipes/multi_epoch.yaml"))
```
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RecipeError
from .io import (
    RecipeProgress,
    barrier,
    changed_fields,
    has_accelerator,
    is_main_process,
    plain,
    read_json,
    world_size,
    write_atomic,
)
from .report import ExperimentResult
from .token_budget_recipe import MultiEpochStudy, load_study_recipe


RESULT_FORMAT = 1


# ---- the budget arithmetic (pure) ----


@dataclass(frozen=True)
class RunPlan:
    """How one run spends the token budget."""

    repetitions: int
    unique_blocks: int
    block_size: int
    global_batch_size: int

    @property
    def unique_tokens(self) -> int:
        return self.unique_blocks * self.block_size

    @property
    def steps(self) -> int:
        return self.repetitions * self.unique_blocks // self.global_batch_size

    @property
    def train_tokens(self) -> int:
        return self.steps * self.global_batch_size * self.block_size


def plan_run(budget_tokens: int, repetitions: int, block_size: int, global_batch_size: int) -> RunPlan:
    """
    Split a budget of `budget_tokens` training tokens into `repetitions` epochs over a unique subset.

    The unique subset is `budget_tokens / (repetitions * block_size)` blocks, rounded down to a multiple of the global
    batch size so that every epoch is made of full batches; choose powers of two to make the budget exact.

    Raises:
        `ValueError`: when the subset is smaller than one global batch.
    """
    blocks = budget_tokens // (repetitions * block_size)
    unique_blocks = blocks // global_batch_size * global_batch_size
    if unique_blocks < global_batch_size:
        raise ValueError(
            f"budget.tokens={budget_tokens} at {repetitions} repetitions gives {blocks} unique blocks of {block_size} "
            f"tokens, fewer than one global batch ({global_batch_size} sequences). Raise budget.tokens or lower the "
            "batch size, block size or the largest repetition count."
        )
    return RunPlan(repetitions, unique_blocks, block_size, global_batch_size)


def run_name(model: str, repetitions: int, dropout: str, seed: int | None = None) -> str:
    """The id of one run: `<model>-r<repetitions>-<dropout>[-s<seed>]` (its result file is `results/<id>.json`)."""
    return f"{model}-r{repetitions}-{dropout}" + ("" if seed is None else f"-s{seed}")


# ---- files ----


def load_results(output_dir: str) -> list[dict]:
    """The finished runs of a study folder (`results/*.json`), in file-name order."""
    folder = os.path.join(output_dir, "results")
    if not os.path.isdir(folder):
        return []
    return [read_json(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".json")]


# ---- the corpus ----


@dataclass
class Corpus:
    """The tokenized training pool and held-out text of a study."""

    tokenizer: Any
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    description: str


def prepare_corpus(study: MultiEpochStudy, needed_tokens: int) -> Corpus:
    """Read, tokenize and split the study's text; check that the pool holds `needed_tokens` training tokens."""
    from regtune.data.char_tokenizer import load_text_tokenizer
    from regtune.data.text import hub_text_tokens, read_text_file, split_text, tokenize_text

    data = study.data
    if data.text_file is not None:
        text = read_text_file(data.text_file)
        train_text, heldout_text = split_text(text, data.heldout_fraction)
        tokenizer = load_text_tokenizer(data.tokenizer, text=train_text)
        train_ids = tokenize_text(tokenizer, train_text)
        heldout_ids = tokenize_text(tokenizer, heldout_text)
        source = f"{data.text_file} (last {data.heldout_fraction:.0%} held out)"
    else:
        if data.tokenizer == "char":
            raise ValueError("data.tokenizer: 'char' needs `text_file`; use 'byte' or a tokenizer name with `hub`.")
        tokenizer = load_text_tokenizer(data.tokenizer)
        hub = {"split": "train", "text_column": "text", "streaming": True, **data.hub}
        ids = hub_text_tokens(tokenizer, needed_tokens + data.heldout_tokens, **hub)
        train_ids, heldout_ids = ids[:needed_tokens], ids[needed_tokens:]
        source = f"{hub['path']} ({hub['split']}; the {data.heldout_tokens} tokens after the training pool held out)"
    if train_ids.numel() < needed_tokens:
        raise ValueError(
            f"budget.tokens: the training pool of {source} has {train_ids.numel()} tokens, fewer than the "
            f"{needed_tokens} that 1 repetition needs. Lower budget.tokens."
        )
    if data.heldout_tokens is not None:
        heldout_ids = heldout_ids[: data.heldout_tokens]
    if heldout_ids.numel() < data.block_size:
        raise ValueError(f"data: the held-out text has {heldout_ids.numel()} tokens, less than one block.")
    return Corpus(tokenizer, train_ids, heldout_ids, source)


def load_or_prepare_corpus(study: MultiEpochStudy, needed_tokens: int, output_dir: str) -> Corpus:
    """
    The study's corpus, prepared once by the main process and cached in `<output_dir>/corpus.pt` (token ids) and
    `<output_dir>/tokenizer/`; the other processes, and later invocations with the same data settings, load it.
    """
    from transformers import AutoTokenizer

    path = os.path.join(output_dir, "corpus.pt")
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    key = json.loads(json.dumps({"data": _data_spec(study), "needed_tokens": needed_tokens}))
    if is_main_process():
        cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        if cached is None or cached.get("key") != key:
            corpus = prepare_corpus(study, needed_tokens)
            corpus.tokenizer.save_pretrained(tokenizer_dir)
            payload = {
                "key": key,
                "train": corpus.train_ids.to(torch.int32),
                "heldout": corpus.heldout_ids.to(torch.int32),
                "description": corpus.description,
            }
            tmp = f"{path}.tmp.{os.getpid()}"
            torch.save(payload, tmp)
            os.replace(tmp, path)
    barrier()
    cached = torch.load(path, weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Corpus(tokenizer, cached["train"].long(), cached["heldout"].long(), cached["description"])


# ---- one run ----


def trainer_training_args(study: MultiEpochStudy) -> dict:
    """The recipe's `training` fields with the study's defaults that are not part of a run's spec."""
    training = dict(study.training)
    # without use_cpu, processes started by torchrun / accelerate on a machine without GPUs would each train alone
    training.setdefault("use_cpu", not has_accelerator())
    training.setdefault("dataloader_pin_memory", has_accelerator())
    return training


def init_distributed(study: MultiEpochStudy) -> None:
    """Set up the process group (if launched with several processes) exactly as the runs' TrainingArguments will."""
    from transformers import TrainingArguments

    TrainingArguments(output_dir=study.output_dir, **trainer_training_args(study)).world_size  # noqa: B018


def _file_identity(path: str) -> dict:
    """A text file as a run's spec records it: its name and content hash (not where this machine keeps it), so that
    a moved checkout still resumes and an edited corpus is never silently reused."""
    with open(path, "rb") as f:
        return {"name": os.path.basename(path), "sha256": hashlib.sha256(f.read()).hexdigest()}


def _data_spec(study: MultiEpochStudy) -> dict:
    data = study.data
    return {
        "text_file": _file_identity(data.text_file) if data.text_file else None,
        "hub": data.hub,
        "tokenizer": data.tokenizer,
        "heldout_fraction": data.heldout_fraction if data.text_file else None,
        "heldout_tokens": data.heldout_tokens,
        "block_size": data.block_size,
    }


def run_spec(study: MultiEpochStudy, model: str, repetitions: int, dropout: str, plan: RunPlan, seed: int) -> dict:
    """Everything that determines a run's result; a finished run is reused only when its stored spec is equal."""
    return {
        "data": _data_spec(study),
        "budget_tokens": study.budget_tokens,
        "subset": "nested random blocks",  # how the unique subset is drawn (see regtune.data.text.nested_block_subset)
        "repetitions": repetitions,
        "unique_blocks": plan.unique_blocks,
        "global_batch_size": plan.global_batch_size,
        "model": study.models[model],
        "hidden_dropout": study.hidden_dropout,
        "dropout": study.dropout[dropout],
        "training": study.training,
        "seed": seed,
        "evaluation": {"points": study.eval_points, "curve_tokens": study.eval_curve_tokens},
    }


def build_model(study: MultiEpochStudy, model: str, vocab_size: int, tokenizer, seed: int):
    """A freshly initialized causal LM of size `model` (runs of a size and seed start from equal weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from regtune.functional.dropout import add_hidden_dropout, typed_dropout_sites

    fields = dict(study.models[model])
    model_type = fields.pop("model_type")
    fields.setdefault("max_position_embeddings", study.data.block_size)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **fields)
    set_seed(seed)
    lm = AutoModelForCausalLM.from_config(config)
    has_hidden = any(t == "hidden" for _, _, t in typed_dropout_sites(lm, ("modules", "attributes")))
    if study.hidden_dropout is True or (study.hidden_dropout == "auto" and not has_hidden):
        add_hidden_dropout(lm, p=0.0)  # the schedule sets the rate
    return lm


def _curves(log_history: list[dict], tokens_per_step: int) -> dict[str, list[list[float]]]:
    def curve(key: str) -> list[list[float]]:
        return [[log["step"] * tokens_per_step, log[key]] for log in log_history if key in log and "step" in log]

    return {"train": curve("loss"), "heldout": curve("eval_loss")}


def _applied_dropout_recorder(schedule, phases: int = 4):
    """
    A callback that reads the dropout rates set on the model at every optimizer step (after the schedule set them);
    its `summary()` gives the mean applied rate per type over the run, and per phase (equal shares of the steps). It
    sees the steps trained by this process: a run resumed from a checkpoint reports the steps after it.
    """
    from transformers import TrainerCallback

    from regtune.functional.dropout import get_dropout_values

    class AppliedDropout(TrainerCallback):
        def __init__(self):
            self.steps: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            sites = {t: get_dropout_values(schedule.sites(t)) for t in schedule.types}
            self.steps.append({t: sum(map(float, v)) / len(v) for t, v in sites.items() if v})

        def summary(self) -> tuple[dict[str, float], dict[str, list[float]]]:
            n = len(self.steps)
            bounds = [round(i * n / phases) for i in range(phases + 1)]
            types = self.steps[0] if n else {}
            by_phase = {t: [_mean([s[t] for s in self.steps[a:b]]) for a, b in zip(bounds, bounds[1:])] for t in types}
            return {t: _mean([s[t] for s in self.steps]) for t in types}, by_phase

    return AppliedDropout()


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)


def train_one(
    study: MultiEpochStudy,
    corpus: Corpus,
    model: str,
    repetitions: int,
    dropout: str,
    plan: RunPlan,
    run_dir: str,
    seed: int | None = None,
) -> dict:
    """Train and evaluate one run (of `seed`, by default the study's); return its result (not yet written)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from regtune.data.text import BlockDataset, make_blocks, nested_block_subset
    from regtune.regularizers.dropout_schedule import DropoutSchedule, DropoutScheduleCallback

    seed = study.seed if seed is None else seed
    block = study.data.block_size
    train_blocks = nested_block_subset(corpus.train_ids, block, plan.unique_blocks, seed=seed)
    heldout_blocks = make_blocks(corpus.heldout_ids, block)
    curve_blocks = heldout_blocks
    if study.eval_curve_tokens is not None:
        curve_blocks = heldout_blocks[: max(study.eval_curve_tokens // block, 1)]
    fit_blocks = train_blocks[: heldout_blocks.shape[0]]  # the same number of tokens as the held-out evaluation

    lm = build_model(study, model, len(corpus.tokenizer), corpus.tokenizer, seed)
    n_params = sum(p.numel() for p in lm.parameters())
    eval_steps = max(plan.steps // study.eval_points, 1) if study.eval_points else None
    training = trainer_training_args(study)
    training.setdefault("logging_steps", max(plan.steps // 50, 1))
    args = TrainingArguments(
        output_dir=run_dir,
        num_train_epochs=repetitions,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        eval_on_start=bool(eval_steps),
        per_device_eval_batch_size=study.eval_batch_size,
        seed=seed,
        data_seed=seed,
        **training,
    )
    schedule = DropoutSchedule(**study.dropout[dropout])
    applied = _applied_dropout_recorder(schedule)
    trainer = Trainer(
        model=lm,
        args=args,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(curve_blocks),
        callbacks=[DropoutScheduleCallback(schedule), applied],
    )
    trainer.remove_callback(PrinterCallback)  # the study prints one line per run
    checkpoint = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    start = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - start
    if trainer.state.global_step != plan.steps:
        raise RuntimeError(f"run {os.path.basename(run_dir)}: trained {trainer.state.global_step} steps, "
                           f"planned {plan.steps}")  # fmt: skip
    heldout = trainer.evaluate(BlockDataset(heldout_blocks), metric_key_prefix="heldout")
    fit = trainer.evaluate(BlockDataset(fit_blocks), metric_key_prefix="train")
    tokens_per_step = plan.global_batch_size * block
    mean_dropout, phase_dropout = applied.summary()
    result = {
        "format": RESULT_FORMAT,
        "run": os.path.basename(run_dir),
        "model": model,
        "repetitions": repetitions,
        "dropout": dropout,
        "seed": seed,
        "unique_tokens": plan.unique_tokens,
        "train_tokens": plan.train_tokens,
        "steps": plan.steps,
        "n_params": n_params,
        "tokens_per_param": round(plan.train_tokens / n_params, 2),
        "heldout_loss": heldout["heldout_loss"],
        "heldout_tokens": int(heldout_blocks.numel()),
        "train_loss_eval": fit["train_loss"],
        "final_train_loss": next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None),
        "mean_dropout": mean_dropout,  # read from the model's dropout modules at every step, not from the schedule
        "phase_dropout": phase_dropout,  # the same, per quarter of training
        "curves": _curves(trainer.state.log_history, tokens_per_step),
        "train_seconds": round(train_seconds, 1),
        "world_size": world_size(),
    }
    del trainer, lm
    gc.collect()
    return result


# ---- the study ----


def plan_study(study: MultiEpochStudy) -> list[tuple[str, int, str, int, RunPlan]]:
    """
    The runs of a study, `(model, repetitions, dropout, seed, plan)`, in the order they run: seed by seed (so that a
    study stopped early holds whole grids), then model, repetitions and dropout.
    """
    per_device, accumulation = (
        study.training.get("per_device_train_batch_size", 8),
        study.training.get("gradient_accumulation_steps", 1),
    )
    batch = per_device * accumulation * world_size()
    plans = {r: plan_run(study.budget_tokens, r, study.data.block_size, batch) for r in study.repetitions}
    return [
        (m, r, d, seed, plans[r])
        for seed in study.run_seeds
        for m in study.models
        for r in study.repetitions
        for d in study.dropout
    ]


def run_multi_epoch_study(
    recipe,
    output_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    report_only: bool = False,
    verbose: bool = True,
) -> ExperimentResult:
    """
    Run (or continue) a multi-epoch study and write its table and plots.

    Args:
        recipe (`str`, `os.PathLike`, `dict` or `MultiEpochStudy`): the study recipe (see
            [`~regtune.experiments.token_budget_recipe`]).
        output_dir (`str`, *optional*): overrides the recipe's `output_dir`.
        overrides (`dict[str, Any]`, *optional*): `{"key.path": value}` applied to the recipe before validation.
        overwrite (`bool`, defaults to `False`): rerun finished runs whose stored settings differ from the recipe's
            (without it, such a run is an error: use another `output_dir`).
        report_only (`bool`, defaults to `False`): train nothing; rewrite the table and plots from finished runs.
        verbose (`bool`, defaults to `True`): print one line per run.

    Returns:
        [`~regtune.experiments.report.ExperimentResult`]: the results of the study's runs that are finished, the runs trained and skipped now, and the
        paths of the written files (`json`, `table`, `plot`, `heldout_vs_repetitions`, `training_curves`).
    """
    from .token_budget_report import write_report

    def log(message: str) -> None:
        if verbose and is_main_process():
            print(f"[multi-epoch] {message}", flush=True)

    started = time.time()
    study = recipe if isinstance(recipe, MultiEpochStudy) else load_study_recipe(recipe, overrides)
    if output_dir is not None:
        study.output_dir = output_dir
    out = study.output_dir
    if study.torch_num_threads:
        torch.set_num_threads(study.torch_num_threads)
    init_distributed(study)
    runs = plan_study(study)
    names = [run_name(m, r, d, s if study.seeds is not None else None) for m, r, d, s, _ in runs]
    todo, skipped = [], []
    for (model, repetitions, dropout, seed, plan), name in zip(runs, names):
        path = os.path.join(out, "results", f"{name}.json")
        spec = run_spec(study, model, repetitions, dropout, plan, seed)
        if os.path.exists(path):
            stored = read_json(path).get("spec")
            if stored == plain(spec):
                skipped.append(name)
                continue
            if not overwrite and not report_only:
                changed = "; ".join(changed_fields(stored, plain(spec))[:8])
                message = f"{path} holds this run with other settings than the recipe's ({changed}). "
                message += "Use another output_dir, or --overwrite to rerun it."
                raise RecipeError([(f"runs.{name}", message)], study.source)
        todo.append((name, model, repetitions, dropout, seed, plan, spec))
    barrier()
    if is_main_process():
        os.makedirs(out, exist_ok=True)
        write_atomic(os.path.join(out, "study.json"), study.to_dict())
    if skipped:
        log(f"{len(skipped)} finished run(s) found in {out}/results, skipped: {', '.join(skipped)}")
    ran = []
    progress = RecipeProgress(len(runs), lambda line: log(line.replace("[regtune] ", "")), "runs")
    for _ in skipped:
        progress.skip()
    if todo and not report_only:
        corpus = load_or_prepare_corpus(study, max(plan.unique_tokens for *_, plan in runs), out)
        log(
            f"corpus {corpus.description}: {corpus.train_ids.numel()} training-pool tokens, "
            f"{corpus.heldout_ids.numel()} held-out tokens, vocabulary {len(corpus.tokenizer)}",
        )
        for i, (name, model, repetitions, dropout, seed, plan, spec) in enumerate(todo, 1):
            run_dir = os.path.join(out, "runs", name)
            barrier()
            if is_main_process():
                spec_path = os.path.join(run_dir, "spec.json")
                if os.path.isdir(run_dir) and (not os.path.exists(spec_path) or read_json(spec_path) != plain(spec)):
                    shutil.rmtree(run_dir)  # an unfinished run of other settings: start it again
                write_atomic(spec_path, spec)
            barrier()
            log(
                f"[{i}/{len(todo)}] {name}: {plan.unique_tokens} unique tokens x {repetitions} = {plan.train_tokens} "
                f"tokens, {plan.steps} steps",
            )
            start = time.perf_counter()
            result = train_one(study, corpus, model, repetitions, dropout, plan, run_dir, seed)
            result["spec"] = spec
            if is_main_process():
                write_atomic(os.path.join(out, "results", f"{name}.json"), result)
                write_report(out, load_results(out), study)
                shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are not needed once the result is saved
            ran.append(name)
            log(
                f"    held-out loss {result['heldout_loss']:.4f}, train loss (eval mode) "
                f"{result['train_loss_eval']:.4f}, {result['train_seconds']:.0f} s",
            )
            progress.finished(time.perf_counter() - start)
    barrier()
    if is_main_process() and os.path.isdir(os.path.join(out, "runs")) and not os.listdir(os.path.join(out, "runs")):
        os.rmdir(os.path.join(out, "runs"))
    results = [r for r in load_results(out) if r.get("run") in set(names)]
    files = {}
    if is_main_process():
        files = write_report(out, results, study)
    wall = time.time() - started
    log(f"done in {wall:.0f} s: {len(ran)} run(s) trained, {len(skipped)} skipped; table {files.get('table')}")
    table = ""
    if files.get("table") and os.path.exists(files["table"]):
        with open(files["table"], encoding="utf-8") as f:
            table = f.read()
    return ExperimentResult(out, results, table, files, ran, skipped, wall)
