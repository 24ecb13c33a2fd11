"""Few-shot text classification with all-MiniLM-L6-v2: LoRA, DoRA, LoRA+, ALLoRA (gradient- and update-side).

A small, reusable harness (import the functions, or run it as a script):

* Model: the offline all-MiniLM-L6-v2 as `AutoModelForSequenceClassification` (BERT pooler + a new linear head).
  Every method adapts the same modules (`["query", "key", "value", "dense"]`: the 36 linear layers of the encoder
  and the CLS pooler's dense layer) with rank 8; the new classification head is trained in full (peft
  `task_type="SEQ_CLS"` puts it in `modules_to_save`).
* Data (/work/shared/data): SST-2 (train.tsv pool, dev.tsv test), TREC coarse labels (train_5500 pool,
  TREC_10 test), MR (rt-polarity, seeded 80/20 split), AG News (test.csv only, seeded split: 2,000 test / rest pool).
  A validation set (default 256 examples) is carved once from the pool; k-shot train sets (k per class) are then
  drawn from the rest of the pool, one per seed. The test set is a fixed 500-example subsample.
* Training: `regtune.RegTrainer` (a `transformers.Trainer`) with the method's optimizer (AdamW, weight decay 0;
  LoRA+'s and ALLoRA's update-side optimizers from peft and regtune), batch 16, max_len 64, a fixed number of steps,
  linear decay of the learning rate to 0 (no warm-up), no gradient clipping. Test accuracy is evaluated at several step checkpoints; the training
  loss is logged every step, and the mean Frobenius norm of the adapters' effective update `scaling * B A`.
* Protocol: for every (dataset, method) the learning rate is chosen on a grid with seed 0 by the accuracy on the
  validation set at the last step (ties go to the smaller lr); then `--seeds` seeds are trained at that lr and
  evaluated on the test set. Mean and std (population std over seeds) are reported.

Usage:
    python -m bench.fewshot        # default budget: sst2 + trec, k=16, 60 steps, 3 lrs x 1 seed + 3 seeds, 5 methods
                                   # (33 CPU-minutes; 58 min wall with --threads 1 on 2 busy shared cores)
    python -m bench.fewshot --datasets sst2 --steps 40 --seeds 0 --methods lora allora_update   # a quick look

Outputs bench/out/fewshot.json, fewshot.md, fewshot.png (with `--tag X`: fewshot_X.*).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import peft
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, TrainerCallback

import regtune
from bench._common import OUT_DIR, TARGET_MODULES, machine_description, minilm_dir, quiet_transformers
from bench.data import AG_NEWS_LABELS, DATA_DIR, SST2_LABELS, data_path, read_ag_news, read_mr, read_sst2, read_trec
from bench.results import mean_std, write_results


METHOD_LABELS = {
    "lora": "LoRA",
    "dora": "DoRA",
    "loraplus": "LoRA+",
    "allora_gradient": "ALLoRA (gradient-side)",
    "allora_update": "ALLoRA (update-side)",
}
DATASETS = ("sst2", "trec", "mr", "ag_news")
DEFAULT_LR_GRID = [3e-4, 1e-3, 3e-3]
# LoRA+ multiplies the lr of B (and of 1-d params) by 16, so its base-lr grid sits lower.
DEFAULT_METHOD_LR_GRIDS = {"loraplus": [1e-4, 3e-4, 1e-3]}


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class TextDataset:
    name: str
    label_names: list[str]
    pool: list[tuple[str, int]]  # train pool (validation and k-shot sets are drawn from it)
    test: list[tuple[str, int]]


def load_dataset(name: str, data_dir: str = DATA_DIR) -> TextDataset:
    """Load one dataset as (pool, test); the seeded splits (MR, AG News) are fixed (seed 0)."""
    if name == "sst2":
        return TextDataset(
            name,
            SST2_LABELS,
            read_sst2(data_path("sst2", "train.tsv", data_dir=data_dir)),
            read_sst2(data_path("sst2", "dev.tsv", data_dir=data_dir)),
        )
    if name == "trec":
        labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]  # this bench's order (its seeded heads depend on it)
        return TextDataset(
            name,
            labels,
            read_trec(data_path("trec", "train_5500.label", data_dir=data_dir), labels),
            read_trec(data_path("trec", "TREC_10.label", data_dir=data_dir), labels),
        )
    if name == "mr":
        rows = read_mr(data_path("mr", data_dir=data_dir))
        random.Random(0).shuffle(rows)
        n_test = len(rows) // 5
        return TextDataset(name, SST2_LABELS, rows[n_test:], rows[:n_test])
    if name == "ag_news":
        rows = read_ag_news(data_path("ag_news", "test.csv", data_dir=data_dir), joiner=" ")
        random.Random(0).shuffle(rows)
        return TextDataset(name, AG_NEWS_LABELS, rows[2000:], rows[:2000])
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def split_fewshot(
    data: TextDataset, *, k: int, seeds: list[int], n_val: int = 256, n_test: int = 500
) -> tuple[dict[int, list], list, list]:
    """Return `({seed: k-shot train set}, validation set, test subsample)`.

    The validation set is drawn once (seed 1000) from the pool; each seed's k-per-class train set is drawn from the
    rest of the pool; the test subsample is fixed (seed 2000).
    """
    pool = list(data.pool)
    random.Random(1000).shuffle(pool)
    val, rest = pool[:n_val], pool[n_val:]
    by_class: dict[int, list] = {}
    for text, label in rest:
        by_class.setdefault(label, []).append((text, label))
    trains = {}
    for seed in seeds:
        rng = random.Random(seed)
        train = []
        for label in sorted(by_class):
            train += rng.sample(by_class[label], min(k, len(by_class[label])))
        rng.shuffle(train)
        trains[seed] = train
    test = list(data.test)
    if len(test) > n_test:
        test = random.Random(2000).sample(test, n_test)
    return trains, val, test


# ---------------------------------------------------------------------------------------------------- model


def build_model(method: str, num_labels: int, lr: float, *, r: int = 8, eta: float = 2.0, seed: int = 0):
    """Return `(peft_model, optimizer)` for `method` (see METHOD_LABELS); the head and adapters are seeded."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
    common = {"r": r, "target_modules": TARGET_MODULES, "task_type": "SEQ_CLS"}
    if method in ("lora", "dora", "loraplus"):
        config = peft.LoraConfig(lora_alpha=2 * r, lora_dropout=0.1, use_dora=method == "dora", **common)
    elif method in ("allora_gradient", "allora_update"):
        coefficient_on = "update" if method == "allora_update" else "gradient"
        config = regtune.ALLoRAConfig(eta=eta, coefficient_on=coefficient_on, **common)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHOD_LABELS)}")
    model = peft.get_peft_model(base, config)
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16, weight_decay=0.0)
    elif method == "allora_update":
        optimizer = regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return model, optimizer


def _adapter_layers(model):
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name in module.lora_A.keys():
                yield module, name


@torch.no_grad()
def mean_delta_norm(model) -> float:
    """Mean over adapted layers of ||scaling * B A||_F (via the r x r Gram matrices; for DoRA the LoRA part only)."""
    norms = []
    for module, name in _adapter_layers(model):
        a = module.lora_A[name].weight.float()
        b = module.lora_B[name].weight.float()
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
        norms.append(float(module.scaling[name]) * float(sq.sqrt()))
    return sum(norms) / max(len(norms), 1)


# ------------------------------------------------------------------------------------------------- training


def encode(tokenizer, examples, max_len: int):
    """Tokenize once: list of (input_ids list, label)."""
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_len)
    return [(ids, label) for ids, (_, label) in zip(enc["input_ids"], examples)]


def collate(batch, pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([lab for _, lab in batch])}


@torch.inference_mode()
def accuracy(model, encoded, pad_id: int, batch_size: int = 64) -> float:
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # length-sorted: less padding
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start : start + batch_size]], pad_id)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(encoded)


class _Checkpoints(TrainerCallback):
    """At the chosen steps: accuracy on each eval set, mean ||scaling * B A||, copies of the trainable parameters;
    every step: the training loss (from the Trainer's per-step log); stops the run at the first non-finite loss."""

    def __init__(self, evals_enc: dict, pad_id: int, eval_at, keep_states_at):
        self.evals_enc, self.pad_id = evals_enc, pad_id
        self.eval_at, self.keep_states_at = set(eval_at), set(keep_states_at)
        self.losses: list[float] = []
        self.evals: dict = {name: {} for name in evals_enc}
        self.delta_norms: dict = {}
        self.states: dict = {}
        self.diagnostics: dict = {}  # the trainer's mechanism diagnostics (e.g. allora/c_over_eta_min) per step

    def checkpoint(self, model, step: int) -> None:
        if step in self.eval_at:
            for name, enc in self.evals_enc.items():
                self.evals[name][step] = accuracy(model, enc, self.pad_id)
        self.delta_norms[step] = mean_delta_norm(model)
        if step in self.keep_states_at:
            self.states[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.eval_at | self.keep_states_at:
            self.checkpoint(model, 0)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        for key, value in (logs or {}).items():
            if key.count("/") == 1 and isinstance(value, (int, float)):
                self.diagnostics.setdefault(key, []).append(float(value))
        if logs and "loss" in logs:
            loss = float(logs["loss"])
            self.losses.append(loss if math.isfinite(loss) else float("nan"))
            if not math.isfinite(loss):
                control.should_training_stop = True
            elif state.global_step in self.eval_at | self.keep_states_at:
                self.checkpoint(model, state.global_step)


def train_run(
    method: str,
    lr: float,
    train,
    eval_sets: dict,
    *,
    num_labels: int,
    steps: int,
    eval_at: list[int],
    seed: int,
    tokenizer,
    batch_size: int = 16,
    max_len: int = 64,
    r: int = 8,
    eta: float = 2.0,
    keep_states_at: list[int] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train one model with `regtune.RegTrainer` (its own optimizer and a linear decay of the lr to 0 over `steps`;
    no warm-up, no gradient clipping, batches never straddle an epoch); return the per-step losses and the accuracies
    on each of `eval_sets` at `eval_at` steps. Training stops after `stop_after` steps when given (the lr schedule
    still spans `steps`) and at the first non-finite loss.

    The trainable parameters at every `keep_states_at` step are kept in `run["states"]` (copies) so that more sets can
    be evaluated later with [`evaluate_states`] without training again.
    """
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainingArguments

    train_enc = encode(tokenizer, train, max_len)
    evals_enc = {name: encode(tokenizer, examples, max_len) for name, examples in eval_sets.items()}
    model, optimizer = build_model(method, num_labels, lr, r=r, eta=eta, seed=seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    record = _Checkpoints(evals_enc, tokenizer.pad_token_id, eval_at, keep_states_at or ())
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=stop_after or steps,
            per_device_train_batch_size=batch_size,
            dataloader_drop_last=len(train_enc) >= batch_size,  # a smaller train set is one (smaller) batch
            max_grad_norm=0.0,
            seed=seed,
            logging_steps=1,
            logging_nan_inf_filter=False,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        dataset = Dataset.from_dict(
            {
                "input_ids": [ids for ids, _ in train_enc],
                "attention_mask": [[1] * len(ids) for ids, _ in train_enc],
                "labels": [label for _, label in train_enc],
            }
        )
        trainer = regtune.RegTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=DataCollatorWithPadding(tokenizer),
            optimizers=(optimizer, scheduler),
            callbacks=[record],
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    run = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "losses": record.losses,
        "eval": record.evals,
        "delta_norm": record.delta_norms,
        "diagnostics": record.diagnostics,
        "seconds": seconds,
    }
    if keep_states_at:
        run["states"] = record.states
    return run


def evaluate_states(
    method: str, states: dict, examples, *, num_labels: int, tokenizer, max_len: int = 64, r: int = 8, eta: float = 2.0
) -> dict:
    """Accuracy on `examples` of every checkpoint in `states` ({step: trainable parameters}) of a `method` model."""
    enc = encode(tokenizer, examples, max_len)
    model, _ = build_model(method, num_labels, lr=1e-3, r=r, eta=eta, seed=0)
    out = {}
    for step, state in states.items():
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise KeyError(f"evaluate_states: unknown parameters {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
        out[step] = accuracy(model, enc, tokenizer.pad_token_id)
    return out


# ------------------------------------------------------------------------------------------------ experiment


def run_dataset(name: str, args, tokenizer, log=print) -> dict:
    data = load_dataset(name, args.data_dir)
    num_labels = len(data.label_names)
    trains, val, test = split_fewshot(data, k=args.k, seeds=sorted(set(args.seeds) | {args.tune_seed}))
    eval_at = sorted({s for s in args.eval_at if 0 < s <= args.steps} | {args.steps})
    # At step 0 every method is the same model (B = 0, the same seeded head), so its accuracy is computed once a seed.
    enc_test = encode(tokenizer, test, args.max_len)
    step0 = {}
    if 0 in args.eval_at:
        for seed in args.seeds:
            model, _ = build_model("lora", num_labels, 1e-3, r=args.r, seed=seed)
            step0[seed] = accuracy(model, enc_test, tokenizer.pad_token_id)
            log(f"[{name}] seed={seed}: test acc at step 0 {step0[seed]:.3f}", flush=True)
    common = dict(
        num_labels=num_labels,
        steps=args.steps,
        seed=args.tune_seed,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_len=args.max_len,
        r=args.r,
        eta=args.eta,
    )
    result = {"num_labels": num_labels, "n_train": len(trains[args.tune_seed]), "n_val": len(val), "n_test": len(test)}
    result["methods"] = {}
    for method in args.methods:
        grid = args.lr_grids.get(method, args.lr_grids["*"])
        tuning, tuning_runs = {}, {}
        # the tuning run of the chosen lr is also the final run of the tuning seed: its checkpoints are kept and
        # evaluated on the test set once the lr is chosen (the test set plays no part in the choice)
        reuse = args.tune_seed in args.seeds
        for lr in grid:
            if len(grid) == 1:
                break
            run = train_run(
                method,
                lr,
                trains[args.tune_seed],
                {"val": val},
                eval_at=[args.steps],
                keep_states_at=eval_at if reuse else None,
                **common,
            )
            tuning[lr] = run["eval"]["val"].get(args.steps, float("nan"))
            tuning_runs[lr] = run
            log(f"[{name}] tune {method} lr={lr:g}: val acc {tuning[lr]:.3f} ({run['seconds']:.0f} s)", flush=True)
        best_lr = grid[0] if len(grid) == 1 else max(grid, key=lambda lr: (tuning[lr], -lr))
        runs = []
        for seed in args.seeds:
            if seed == args.tune_seed and best_lr in tuning_runs and reuse:
                run = tuning_runs[best_lr]
                run["eval"]["test"] = evaluate_states(
                    method,
                    run.pop("states"),
                    test,
                    num_labels=num_labels,
                    tokenizer=tokenizer,
                    max_len=args.max_len,
                    r=args.r,
                    eta=args.eta,
                )
            else:
                run = train_run(
                    method, best_lr, trains[seed], {"test": test}, eval_at=eval_at, **{**common, "seed": seed}
                )
            if seed in step0:
                run["eval"]["test"] = {0: step0[seed], **run["eval"]["test"]}
                run["delta_norm"] = {0: 0.0, **run["delta_norm"]}
            runs.append(run)
            final = run["eval"]["test"].get(args.steps, float("nan"))
            log(
                f"[{name}] {method} lr={best_lr:g} seed={seed}: test acc {final:.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
        curve = {
            step: mean_std([run["eval"]["test"].get(step, float("nan")) for run in runs])
            for step in ([0] if step0 else []) + eval_at
        }
        n_early = min(args.early_steps, args.steps)
        early = mean_std([statistics.fmean(run["losses"][:n_early]) for run in runs if len(run["losses"]) >= n_early])
        for run in tuning_runs.values():
            run.pop("states", None)
        result["methods"][method] = {
            "lr_grid": grid,
            "tuning_val_acc": tuning,
            "tuning_runs": {
                lr: {"losses": run["losses"], "delta_norm": run["delta_norm"]} for lr, run in tuning_runs.items()
            },
            "chosen_lr": best_lr,
            "chosen_lr_on_grid_edge": len(grid) > 1 and best_lr in (min(grid), max(grid)),
            "test_acc_mean": curve[args.steps][0],
            "test_acc_std": curve[args.steps][1],
            "curve": {str(step): {"mean": m, "std": s} for step, (m, s) in curve.items()},
            "early_loss_mean": early[0],
            "early_loss_std": early[1],
            "runs": runs,
        }
    return result


def parse_lr_grids(specs: list[str] | None) -> dict[str, list[float]]:
    """`["3e-4,1e-3"]` sets the grid of every method; `["loraplus=1e-4,3e-4"]` that of one method."""
    grids = {"*": list(DEFAULT_LR_GRID), **{k: list(v) for k, v in DEFAULT_METHOD_LR_GRIDS.items()}}
    for spec in specs or []:
        if "=" in spec:
            method, values = spec.split("=", 1)
            if method not in METHOD_LABELS:
                raise ValueError(f"--lr-grid: unknown method {method!r}")
            grids[method] = [float(v) for v in values.split(",")]
        else:
            grids = {"*": [float(v) for v in spec.split(",")]}  # one grid for all methods, LoRA+ included
    return grids


def smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else float("nan"))
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        methods = result["datasets"][name]["methods"]
        ax_acc, ax_loss = axes[0][col], axes[1][col]
        for method, res in methods.items():
            steps = [int(s) for s in res["curve"]]
            mean = [res["curve"][str(s)]["mean"] for s in steps]
            std = [res["curve"][str(s)]["std"] for s in steps]
            label = f"{METHOD_LABELS[method]} (lr {res['chosen_lr']:g})"
            (line,) = ax_acc.plot(steps, mean, marker="o", ms=3, label=label)
            ax_acc.fill_between(
                steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15
            )
            n = min(len(run["losses"]) for run in res["runs"])
            loss = [statistics.fmean(run["losses"][i] for run in res["runs"]) for i in range(n)]
            ax_loss.plot(range(1, n + 1), smooth(loss, 5), color=line.get_color(), label=METHOD_LABELS[method])
        cfg = result["config"]
        ax_acc.set_title(f"{name}: k={cfg['k']}/class, {len(cfg['seeds'])} seeds")
        ax_acc.set_xlabel("training step")
        ax_acc.set_ylabel("test accuracy (mean ± std)")
        ax_acc.grid(alpha=0.3)
        ax_acc.legend(fontsize=7)
        ax_loss.set_xlabel("training step")
        ax_loss.set_ylabel("train loss (seed mean, 5-step moving avg)")
        ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    cfg = result["config"]
    names = list(result["datasets"])
    methods = cfg["methods"]
    n_early = min(cfg["early_steps"], cfg["steps"])
    lines = [
        f"Few-shot accuracy (test, step {cfg['steps']}), all-MiniLM-L6-v2, r={cfg['r']}, k={cfg['k']} per class, "
        f"batch {cfg['batch_size']}, max_len {cfg['max_len']}, seeds {cfg['seeds']}; mean ± std (chosen lr; "
        "`*` = lr at the edge of its grid).",
        "",
        "| method | " + " | ".join(names) + " | mean |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for method in methods:
        cells, means = [], []
        for name in names:
            res = result["datasets"][name]["methods"][method]
            edge = "*" if res["chosen_lr_on_grid_edge"] else ""
            cells.append(
                f"{100 * res['test_acc_mean']:.1f} ± {100 * res['test_acc_std']:.1f} ({res['chosen_lr']:g}{edge})"
            )
            means.append(res["test_acc_mean"])
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + f" | {100 * statistics.fmean(means):.1f} |")

    checkpoints = [int(s) for s in result["datasets"][names[0]]["methods"][methods[0]]["curve"]]
    lines += ["", "Test accuracy (mean over seeds, %) at each checkpoint:", ""]
    lines += ["| dataset | method | " + " | ".join(f"step {s}" for s in checkpoints) + " |"]
    lines += ["| --- | --- | " + " | ".join("---:" for _ in checkpoints) + " |"]
    for name in names:
        for method in methods:
            curve = result["datasets"][name]["methods"][method]["curve"]
            cells = [f"{100 * curve[str(s)]['mean']:.1f}" for s in checkpoints]
            lines.append(f"| {name} | {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"Escape from 0: mean training loss over the first {n_early} steps (mean ± std over seeds; lower = faster), "
        "and mean ||scaling·BA||_F over adapted layers at each checkpoint (seed mean):",
        "",
        "| dataset | method | early loss | " + " | ".join(f"‖ΔW‖ @{s}" for s in checkpoints if s > 0) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for s in checkpoints if s > 0) + " |",
    ]
    for name in names:
        for method in methods:
            res = result["datasets"][name]["methods"][method]
            norms = [
                statistics.fmean(run["delta_norm"][s] for run in res["runs"] if s in run["delta_norm"])
                for s in checkpoints
                if s > 0 and all(s in run["delta_norm"] for run in res["runs"])
            ]
            lines.append(
                f"| {name} | {METHOD_LABELS[method]} | {res['early_loss_mean']:.3f} ± {res['early_loss_std']:.3f} | "
                + " | ".join(f"{v:.3f}" for v in norms)
                + " |"
            )

    lines += [
        "",
        "Learning-rate tuning (validation accuracy, seed " + f"{cfg['tune_seed']}, step {cfg['steps']}):",
        "",
    ]
    lines += ["| dataset | method | " + " | ".join(["val acc by lr"]) + " | chosen |", "| --- | --- | --- | ---: |"]
    for name in names:
        for method in methods:
            res = result["datasets"][name]["methods"][method]
            tune = ", ".join(f"{lr:g}: {100 * acc:.1f}" for lr, acc in res["tuning_val_acc"].items())
            lines.append(f"| {name} | {METHOD_LABELS[method]} | {tune or '-'} | {res['chosen_lr']:g} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "trec"], choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS))
    parser.add_argument("--k", type=int, default=16, help="train examples per class")
    parser.add_argument("--steps", type=int, default=60, help="training steps (batch --batch-size)")
    parser.add_argument(
        "--eval-at", type=int, nargs="+", default=[0, 10, 20, 40], help="test checkpoints (+ the last step)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument(
        "--lr-grid",
        action="append",
        help=f"'a,b,c' for every method or 'METHOD=a,b,c' (repeatable). Default {DEFAULT_LR_GRID}, "
        f"{DEFAULT_METHOD_LR_GRIDS}. A single value skips tuning.",
    )
    parser.add_argument("--early-steps", type=int, default=10, help="'escape from 0': mean loss of the first N steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--eta", type=float, default=2.0, help="ALLoRA's eta")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--tag", default="", help="output file suffix")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.lr_grids = parse_lr_grids(args.lr_grid)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    start = time.time()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "lr_grid")}
    result = {"bench": "fewshot", "config": config, "machine": machine_description("cpu"), "datasets": {}}
    for name in args.datasets:
        t0 = time.time()
        result["datasets"][name] = run_dataset(name, args, tokenizer)
        result["datasets"][name]["seconds"] = time.time() - t0
        print(f"[{name}] done in {time.time() - t0:.0f} s", flush=True)
    result["wall_s"] = time.time() - start

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fewshot" + (f"_{args.tag}" if args.tag else ""))
    table = markdown(result)
    table += f"\nWall time {result['wall_s'] / 60:.1f} min on {result['machine']['cpu']} ({args.threads} threads).\n"
    write_results(stem, result, table, plot=plot)
    return result


if __name__ == "__main__":
    main()
