"""LfU evidence (v2): LfU at a calibrated, active strength against an lr-swept SFT, on paired seeds, through the shipped
`regtune.LfUTrainer` and `trl.SFTTrainer`.

The claim tested: LfU (perturb mode) forgets less than SFT for the same in-task fit. The test bed is
[`bench.lfu`]'s, scaled to fit a CPU budget: a character-level Llama (hidden 128, 4 blocks, 0.86M parameters) is
pretrained on the first 90% of Tiny Shakespeare without the turns of GLOUCESTER (cached under `bench/out/`), then
fine-tuned with LoRA on GLOUCESTER's turns as prompt/completion pairs (completion-only loss).

- **in-task loss**: completion loss (nats per character, EOS included) on held-out GLOUCESTER turns;
- **forgetting**: language-modeling loss on 48 x 128-character windows of the held-out 10% of the corpus (other
  plays), after minus before fine-tuning.

Protocol:

1. **Calibration** (seed `CALIBRATION_SEED`, not a test seed; the middle lr; `--calibration-steps` steps): LfU at
   beta 1 for each alpha of `--alphas`, reading the trainer's own diagnostics `lfu/ascent_gain` (how much the ascent
   step raises the loss of the ascent batch x') and `lfu/cons_to_sft` (beta * L_cons / L_sft, here per unit of
   beta). alpha is interpolated (log-log) to an ascent gain of `--target-gain`, beta to a ratio of `--target-ratio`
   at that alpha (the ratio is linear in beta for a fixed trajectory); a last run at the chosen (alpha, beta)
   checks both.
2. **Fronts on paired seeds.** SFT and LfU perturb at the calibrated (alpha, beta), each at every lr of `--lrs`,
   SFT also at `--sft-extra-lrs` (a denser baseline front) and RepS (calibrated the same way) at `--reps-lrs`, on each
   test seed: the same LoRA initialization (`transformers.set_seed(seed)` before the trainer is built) and the same batch
   order (`args.seed`). Reported: each configuration's mean with its 95% t-interval, the paired difference LfU - SFT
   at each lr, and at matched in-task loss (per seed, SFT's forgetting interpolated linearly between its lrs at
   LfU's in-task loss), with LfU's diagnostics of the same runs next to them.

Each run is its own JSON file under `<out>/runs/` (calibration runs under `<out>/calibration/`); existing files are
skipped, so a killed run resumes where it stopped. Usage (from the repository root):

    OMP_NUM_THREADS=1 nice -n 5 python -m bench.lfu_evidence --seeds 0 1 2 3 4      # pretrain, calibrate, fronts
    python -m bench.lfu_evidence --report-only                                        # report from the files

Writes `<out>/results.{json,md}` and `<out>/front.png` (default `bench/results/evidence/lfu`).
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "evidence", "lfu")
SHAPE = {
    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "intermediate_size": 384, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip
PRETRAIN_STEPS = 1500
PRETRAIN_LR = 3e-3
CTX_CHARS, COMPLETION_CHARS = 80, 120
N_TRAIN = 160
CALIBRATION_SEED = 100
DIAGNOSTICS = ("lfu/cons_to_sft", "lfu/ascent_gain", "lfu/ascent_gain_abs", "lfu/consistency")


# ---- data and model ----


def load_data() -> dict:
    """Train/test speaker pairs, the held-out corpus and the pretraining text (bench.lfu's split, shorter turns)."""
    from bench.lfu import read_corpus, speaker_pairs

    train_text, held_out_text = read_corpus()
    pairs, pretrain_text = speaker_pairs(train_text, ctx_chars=CTX_CHARS, completion_chars=COMPLETION_CHARS)
    random.Random(0).shuffle(pairs)
    return {
        "train": pairs[:N_TRAIN],
        "test": pairs[N_TRAIN:],
        "held_out": held_out_text,
        "pretrain": pretrain_text,
    }


def pretrained_model(data: dict, cache: str, steps: int = PRETRAIN_STEPS) -> tuple[str, dict]:
    """The cached pretrained model's directory (pretrained first when missing) and its pretraining record."""
    from bench.lfu import pretrain

    path = os.path.join(cache, f"pretrained-llama-h{SHAPE['hidden_size']}-{steps}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        info = pretrain(data["pretrain"], path + ".tmp", steps, shape=SHAPE, lr=PRETRAIN_LR)
        with open(os.path.join(path + ".tmp", "pretrain.json"), "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
    with open(os.path.join(path, "pretrain.json")) as f:
        info = json.load(f)
    return path, {**info, "shape": SHAPE, "lr": PRETRAIN_LR}


def evaluate(model, tokenizer, data: dict) -> dict:
    from bench.lfu import TEMPLATES, completion_loss, corpus_loss

    return {
        "in_task": completion_loss(model, tokenizer, data["test"], TEMPLATES[0]),
        "corpus": corpus_loss(model, tokenizer, data["held_out"]),
    }


# ---- one run ----


def run_name(config: dict) -> str:
    """`sft_lr0.001` or `lfu-perturb_a0.5_b2_lr0.001` (plus `_steps<n>` when the run is cut)."""
    name = config["method"]
    if name != "sft":
        name += f"_a{config['alpha']:g}_b{config['beta']:g}"
    name += f"_lr{config['lr']:g}"
    if config.get("max_steps"):
        name += f"_steps{config['max_steps']}"
    return name


def diagnostics(log_history: list) -> dict:
    """Mean of each LfU diagnostic over the logs that carry it (and how many do)."""
    out = {}
    for key in DIAGNOSTICS:
        values = [entry[key] for entry in log_history if key in entry]
        if values:
            out[key] = statistics.fmean(values)
            out[f"{key}_n"] = len(values)
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if losses:
        out["train_loss_last_log"] = losses[-1]
    return out


def train_and_evaluate(config: dict, seed: int, model_dir: str, data: dict, epochs: int, batch_size: int) -> dict:
    """Fine-tune the pretrained model with `config` on `seed` through the shipped trainer; its metrics."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    import regtune
    from bench.lfu import TEMPLATES, render

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_dict(
        {
            "prompt": [render(TEMPLATES[0], ctx) for ctx, _ in data["train"]],
            "completion": [turn for _, turn in data["train"]],
        }
    )
    set_seed(seed)  # the same LoRA initialization for every configuration of a seed
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "output_dir": tmp, "report_to": "none", "use_cpu": True, "per_device_train_batch_size": batch_size,
            "num_train_epochs": epochs, "learning_rate": config["lr"], "lr_scheduler_type": "cosine",
            "warmup_steps": 0.1, "logging_steps": 5, "save_strategy": "no", "disable_tqdm": True, "max_length": 256,
            "seed": seed, "bf16": False, "dataset_num_proc": None, "gradient_checkpointing": False,
            "max_steps": config.get("max_steps") or -1,
        }  # fmt: skip
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        if config["method"] == "sft":
            trainer = SFTTrainer(
                model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                peft_config=peft_config,
            )  # fmt: skip
        else:
            args = regtune.LfUConfig(
                **common, lfu_mode=config["method"].split("-", 1)[1], lfu_alpha=config["alpha"],
                lfu_beta=config["beta"],
            )  # fmt: skip
            trainer = regtune.LfUTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
            )
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = evaluate(trainer.model, tokenizer, data)
        metrics["cpu_s"] = time.process_time() - cpu_start  # training + evaluation, all threads
        metrics.update(diagnostics(trainer.state.log_history))
        metrics.update(steps=trainer.state.global_step, train_s=seconds)
    return metrics


def cached_run(path: str, config: dict, seed: int, before: dict, train: bool = True, **kwargs) -> dict:
    """The run's metrics from `path`, or (with `train`) trained now and written there."""
    from regtune.experiments.io import write_atomic

    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if not train:
        raise FileNotFoundError(f"{path} is missing (--report-only trains nothing; run without it first)")
    metrics = train_and_evaluate(config, seed, **kwargs)
    metrics.update(config=config, seed=seed, forgetting=metrics["corpus"] - before["corpus"])
    write_atomic(path, metrics)
    print(json.dumps({"run": os.path.basename(path), **metrics}), flush=True)
    return metrics


# ---- calibration ----


def loglog_interpolate(xs: list[float], ys: list[float], target: float) -> float:
    """The x where the piecewise log-log linear curve through (xs, ys) reaches `target` (extrapolated at the ends)."""
    points = sorted((x, y) for x, y in zip(xs, ys) if x > 0 and y > 0)
    if len(points) < 2:
        raise ValueError(f"need 2 positive points to interpolate, got {points}")
    lx = [math.log(x) for x, _ in points]
    ly = [math.log(y) for _, y in points]
    lt = math.log(target)
    i = next((k for k in range(len(points) - 1) if ly[k + 1] >= lt), len(points) - 2)
    slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])
    if slope == 0:
        raise ValueError(f"flat curve between x={points[i][0]} and x={points[i + 1][0]}")
    return math.exp(lx[i] + (lt - ly[i]) / slope)


def round_sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits}g}")


def calibrate(mode: str, alphas: list[float], cli, kwargs: dict, before: dict) -> dict:
    """alpha -> ascent gain and beta -> cons_to_sft of LfU `mode`, read from LfUTrainer's diagnostics; the choice."""
    lr = sorted(cli.lrs)[len(cli.lrs) // 2]
    method = f"lfu-{mode}"

    def run(alpha, beta):
        config = {"method": method, "alpha": alpha, "beta": beta, "lr": lr, "max_steps": cli.calibration_steps}
        path = os.path.join(cli.out, "calibration", run_name(config) + ".json")
        result = cached_run(path, config, CALIBRATION_SEED, before, **kwargs)
        return {"alpha": alpha, "beta": beta, **{k: result.get(k) for k in DIAGNOSTICS}}

    rows = [run(alpha, 1.0) for alpha in alphas]
    alpha = round_sig(loglog_interpolate(alphas, [r["lfu/ascent_gain"] for r in rows], cli.target_gain))
    # cons_to_sft at beta 1 is L_cons / L_sft; interpolated (log-log) at the chosen alpha
    ratio_at_alpha = math.exp(
        _interp([math.log(a) for a in alphas], [math.log(r["lfu/cons_to_sft"]) for r in rows], math.log(alpha))
    )
    beta = round_sig(cli.target_ratio / ratio_at_alpha)
    rows.append(run(alpha, beta))
    return {
        "mode": mode, "lr": lr, "steps": cli.calibration_steps, "seed": CALIBRATION_SEED,
        "target_gain": cli.target_gain, "target_ratio": cli.target_ratio, "rows": rows, "alpha": alpha, "beta": beta,
        "predicted_ratio_per_beta": ratio_at_alpha,
    }  # fmt: skip


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation of (xs, ys) at x, extrapolated linearly beyond the ends (xs increasing)."""
    points = sorted(zip(xs, ys))
    i = next((k for k in range(len(points) - 1) if points[k + 1][0] >= x), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# ---- the fronts ----


def front_configs(lrs: list[float], lfu: dict, sft_extra_lrs: list[float] = ()) -> list[dict]:
    """
    SFT at each lr of `lrs` and `sft_extra_lrs`; each LfU mode of `lfu` (`{mode: (alpha, beta, its lrs)}`) at each
    of its lrs (the lrs of `lrs` when None).
    """
    out = [{"method": "sft", "lr": lr} for lr in sft_extra_lrs]
    for lr in lrs:
        out.append({"method": "sft", "lr": lr})
        for mode, (alpha, beta, mode_lrs) in lfu.items():
            if mode_lrs is None or lr in mode_lrs:
                out.append({"method": f"lfu-{mode}", "alpha": alpha, "beta": beta, "lr": lr})
    return out


def matched_forgetting(sft_points: list[tuple[float, float]], in_task: float) -> tuple[float, bool]:
    """SFT's forgetting at `in_task`, linear between its (in-task, forgetting) points; whether it was extrapolated."""
    xs = [x for x, _ in sft_points]
    inside = min(xs) <= in_task <= max(xs)
    return _interp(xs, [y for _, y in sft_points], in_task), not inside


def summarize(runs: list[dict], lrs: list[float]) -> dict:  # lrs: every SFT lr
    """Per configuration mean +- 95% CI; paired differences LfU - SFT at each lr and at matched in-task loss."""
    from regtune.experiments.stats import mean_ci, paired_difference

    by_name: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_name.setdefault(run_name(run["config"]), {})[run["seed"]] = run
    configs = {}
    for name, per_seed in by_name.items():
        values = list(per_seed.values())
        configs[name] = {
            "config": values[0]["config"],
            "seeds": sorted(per_seed),
            **{
                key: mean_ci([v[key] for v in values if key in v])
                for key in ("in_task", "forgetting", "corpus", "train_s", *DIAGNOSTICS)
                if any(key in v for v in values)
            },
        }
    sft = {lr: by_name.get(run_name({"method": "sft", "lr": lr}), {}) for lr in lrs}
    lfu_names = [n for n in by_name if not n.startswith("sft")]
    paired, matched = [], []
    for name in lfu_names:
        lfu = by_name[name]
        lr = lfu[next(iter(lfu))]["config"]["lr"]
        row = {"lfu": name, "sft": run_name({"method": "sft", "lr": lr})}
        for key in ("in_task", "forgetting"):
            row[key] = paired_difference({s: r[key] for s, r in lfu.items()}, {s: r[key] for s, r in sft[lr].items()})
        paired.append(row)
        diffs, extrapolated = {}, []
        for seed, run in lfu.items():
            points = [(sft[x][seed]["in_task"], sft[x][seed]["forgetting"]) for x in lrs if seed in sft[x]]
            if len(points) < 2:
                continue
            at, extra = matched_forgetting(points, run["in_task"])
            diffs[seed] = run["forgetting"] - at
            if extra:
                extrapolated.append(seed)
        matched.append(
            {
                "lfu": name,
                "forgetting": paired_difference(diffs, dict.fromkeys(diffs, 0.0)),
                "extrapolated": extrapolated,
            }
        )
    return {"configs": configs, "paired_at_lr": paired, "matched_in_task": matched}


def write_report(results: dict, out: str) -> None:
    from regtune.experiments.io import write_atomic
    from regtune.experiments.stats import format_ci

    before = results["before"]
    lines = [
        "# LfU evidence (v2): calibrated LfU vs lr-swept SFT, paired seeds",
        "",
        f"Pretrained model: {results['pretrain']['shape']['hidden_size']}-wide, "
        f"{results['pretrain']['shape']['num_hidden_layers']} blocks, {results['pretrain']['steps']} steps "
        f"(last training loss {results['pretrain']['last_loss']:.3f}); before fine-tuning: in-task "
        f"{before['in_task']:.3f}, held-out corpus {before['corpus']:.3f}.",
    ]
    for cal in results["calibration"].values():
        lines += [
            "",
            f"## Calibration, {cal['mode']} (seed {cal['seed']}, lr {cal['lr']:g}, {cal['steps']} steps; "
            "beta 1 unless named)",
            "",
            "| alpha | beta | ascent gain (x' loss rise) | ascent gain (nats) | beta * L_cons / L_sft | L_cons |",
            "|---|---|---|---|---|---|",
        ]
        for row in cal["rows"]:
            lines.append(
                f"| {row['alpha']:g} | {row['beta']:g} | {row['lfu/ascent_gain']:.2%} | "
                f"{row['lfu/ascent_gain_abs']:.4f} | {row['lfu/cons_to_sft']:.3f} | {row['lfu/consistency']:.2e} |"
            )
        lines += [
            "",
            f"Chosen: alpha = {cal['alpha']:g} (target ascent gain {cal['target_gain']:.0%}), beta = {cal['beta']:g} "
            f"(target ratio {cal['target_ratio']:g}; L_cons / L_sft at that alpha, interpolated: "
            f"{cal['predicted_ratio_per_beta']:.4f}).",
        ]
    lines += [
        "",
        "## Fronts (mean [95% CI] over seeds)",
        "",
        "| run | seeds | in-task loss | forgetting | ascent gain | beta * L_cons / L_sft | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    configs = results["summary"]["configs"]
    for name in sorted(
        configs, key=lambda n: (configs[n]["config"]["method"] != "sft", n.split("_")[0], configs[n]["config"]["lr"])
    ):
        row = configs[name]
        gain = format_ci(row["lfu/ascent_gain"], ".2%") if "lfu/ascent_gain" in row else "-"
        ratio = format_ci(row["lfu/cons_to_sft"], ".3f") if "lfu/cons_to_sft" in row else "-"
        lines.append(
            f"| {name} | {len(row['seeds'])} | {format_ci(row['in_task'], '.4f')} | "
            f"{format_ci(row['forgetting'], '.4f')} | {gain} | {ratio} | {row['train_s']['mean']:.0f} |"
        )
    lines += [
        "",
        "## Paired differences LfU - SFT (mean [95% CI], wins = seeds where LfU is higher)",
        "",
        "| LfU run | SFT run | in-task loss | forgetting |",
        "|---|---|---|---|",
    ]
    for row in results["summary"]["paired_at_lr"]:
        cells = [f"{format_ci(row[k], '+.4f')} ({row[k]['wins']}/{row[k]['n']})" for k in ("in_task", "forgetting")]
        lines.append(f"| {row['lfu']} | {row['sft']} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "At matched in-task loss (per seed, SFT's forgetting interpolated between its lrs at LfU's in-task loss):",
        "",
        "| LfU run | forgetting - SFT's at the same in-task loss | seeds extrapolated |",
        "|---|---|---|",
    ]
    for row in results["summary"]["matched_in_task"]:
        f = row["forgetting"]
        lines.append(
            f"| {row['lfu']} | {format_ci(f, '+.4f')} ({f['wins']}/{f['n']}) | {row['extrapolated'] or 'none'} |"
        )
    lines += ["", f"Machine: {json.dumps(results['machine'])}", ""]
    write_atomic(os.path.join(out, "results.md"), "\n".join(lines))
    write_atomic(os.path.join(out, "results.json"), results)
    print("\n".join(lines))


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, color in (("sft", "tab:blue"), ("lfu-perturb", "tab:red"), ("lfu-reps", "tab:green")):
        rows = [r for r in results["summary"]["configs"].values() if r["config"]["method"] == method]
        rows.sort(key=lambda r: r["config"]["lr"])
        if not rows:
            continue
        xs = [r["in_task"]["mean"] for r in rows]
        ys = [r["forgetting"]["mean"] for r in rows]
        xerr = [
            [r["in_task"]["mean"] - r["in_task"]["lo"] for r in rows],
            [r["in_task"]["hi"] - r["in_task"]["mean"] for r in rows],
        ]
        yerr = [
            [r["forgetting"]["mean"] - r["forgetting"]["lo"] for r in rows],
            [r["forgetting"]["hi"] - r["forgetting"]["mean"] for r in rows],
        ]
        label = (
            method
            if method == "sft"
            else f"LfU {method[4:]} (alpha {rows[0]['config']['alpha']:g}, beta {rows[0]['config']['beta']:g})"
        )
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", color=color, label=label, capsize=3)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(f"lr {r['config']['lr']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("in-task loss (held-out GLOUCESTER turns, nats/char)")
    ax.set_ylabel("forgetting (held-out corpus loss rise, nats/char)")
    ax.set_title("LfU vs SFT fronts (mean, 95% CI over paired seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "front.png"), dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument(
        "--sft-extra-lrs", type=float, nargs="*", default=[2.5e-4, 7e-4, 1.4e-3],
        help="SFT alone at these lrs too: a denser SFT front for the matched comparison",
    )  # fmt: skip
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--reps-lrs", type=float, nargs="*", default=[1e-3], help="RepS at these lrs (none: no RepS)")
    parser.add_argument("--reps-alphas", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--target-gain", type=float, default=0.05)
    parser.add_argument("--target-ratio", type=float, default=0.2)
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=os.path.join(HERE, "out", "lfu_evidence"))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="write the report from the files on disk")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    import datasets

    from bench._common import machine_description, quiet_transformers
    from regtune.experiments.io import write_atomic

    quiet_transformers()
    datasets.disable_progress_bars()
    data = load_data()
    start = time.perf_counter()
    pretrain_path = os.path.join(cli.out, "pretrain.json")
    if cli.report_only:  # the records of the run, not the model: nothing is trained or pretrained
        model_dir = None
        with open(pretrain_path) as f:
            pretrain_info = json.load(f)
    else:
        model_dir, pretrain_info = pretrained_model(data, cli.cache, cli.pretrain_steps)
        write_atomic(pretrain_path, pretrain_info)
    before_path = os.path.join(cli.out, "before.json")
    if os.path.isfile(before_path):
        with open(before_path) as f:
            before = json.load(f)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        before = evaluate(base, AutoTokenizer.from_pretrained(model_dir), data)
        write_atomic(before_path, before)
    kwargs = {"model_dir": model_dir, "data": data, "epochs": cli.epochs, "batch_size": cli.batch_size}
    kwargs["train"] = not cli.report_only
    calibration = {"perturb": calibrate("perturb", cli.alphas, cli, kwargs, before)}
    lfu = {"perturb": (calibration["perturb"]["alpha"], calibration["perturb"]["beta"], None)}
    if cli.reps_lrs:
        calibration["reps"] = calibrate("reps", cli.reps_alphas, cli, kwargs, before)
        lfu["reps"] = (calibration["reps"]["alpha"], calibration["reps"]["beta"], cli.reps_lrs)
    runs = []
    for seed in cli.seeds:
        for config in front_configs(cli.lrs, lfu, cli.sft_extra_lrs):
            path = os.path.join(cli.out, "runs", f"{run_name(config)}_s{seed}.json")
            if os.path.isfile(path) or not cli.report_only:
                runs.append(cached_run(path, config, seed, before, **kwargs))
    results = {
        "pretrain": pretrain_info, "before": before, "calibration": calibration,
        "setup": {
            "seeds": cli.seeds, "lrs": cli.lrs, "sft_extra_lrs": cli.sft_extra_lrs, "epochs": cli.epochs, "batch_size": cli.batch_size,
            "n_train": N_TRAIN, "n_test": len(data["test"]), "ctx_chars": CTX_CHARS,
            "completion_chars": COMPLETION_CHARS, "lora": "r=8, alpha=16, all-linear, dropout 0",
            "gradient_checkpointing": False, "logging_steps": 5,
        },
        "summary": summarize(runs, sorted({*cli.lrs, *cli.sft_extra_lrs})), "machine": machine_description("cpu"),
        "wall_s_this_invocation": time.perf_counter() - start,
        "cpu_s_this_invocation": time.process_time(),
        "compute_s_runs": sum(r["train_s"] for r in runs),
    }  # fmt: skip
    write_report(results, cli.out)
    plot(results, cli.out)


if __name__ == "__main__":
    main()
