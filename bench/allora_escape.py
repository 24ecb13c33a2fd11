"""'Faster escape of B from 0' at equal learning rates: LoRA, DoRA, LoRA+, ALLoRA gradient-/update-side.

The few-shot bench (bench/fewshot.py) compares every method at its own tuned lr, which mixes the lr choice into the
early loss. Here every method runs at the *same* lr (LoRA+: the same base lr, so B gets 16x), on the same k-shot
train sets, seeds and schedule (linear decay over `--schedule-steps`, stopped after `--steps`), with no evaluation:
the training loss of every step and the mean ||scaling * B A||_F over adapted layers are recorded.

Usage: python -m bench.allora_escape [--datasets sst2 trec --lrs 1e-3 3e-3 --steps 20 --seeds 0 1 2]
Writes bench/out/allora_escape.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench._common import DATA_DIR, OUT_DIR, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from bench.fewshot import DATASETS, METHOD_LABELS, load_dataset, split_fewshot, train_run  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "trec"], choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=20, help="steps run")
    parser.add_argument("--schedule-steps", type=int, default=60, help="length of the linear lr decay (as fewshot)")
    parser.add_argument("--report-at", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--eta", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    report_at = sorted(s for s in set(args.report_at) if 0 < s <= args.steps)
    start = time.time()
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine_description("cpu")}
    result["datasets"] = {}
    for name in args.datasets:
        data = load_dataset(name, args.data_dir)
        trains, _, _ = split_fewshot(data, k=args.k, seeds=args.seeds)
        per_lr = {}
        for lr in args.lrs:
            per_method = {}
            for method in args.methods:
                runs = [
                    train_run(
                        method,
                        lr,
                        trains[seed],
                        {},
                        num_labels=len(data.label_names),
                        steps=args.schedule_steps,
                        stop_after=args.steps,
                        eval_at=report_at,
                        seed=seed,
                        tokenizer=tokenizer,
                        eta=args.eta,
                    )
                    for seed in args.seeds
                ]
                stats = {}
                for step in report_at:
                    window = [statistics.fmean(run["losses"][max(0, step - 3) : step]) for run in runs]
                    norms = [run["delta_norm"][step] for run in runs]
                    stats[step] = {
                        "loss_mean": statistics.fmean(window),
                        "loss_std": statistics.pstdev(window),
                        "delta_norm_mean": statistics.fmean(norms),
                    }
                per_method[method] = {"at": stats, "losses": [run["losses"] for run in runs]}
                print(
                    f"[{name}] lr={lr:g} {method}: "
                    + ", ".join(f"loss@{s} {stats[s]['loss_mean']:.3f}" for s in report_at),
                    flush=True,
                )
            per_lr[str(lr)] = per_method
        result["datasets"][name] = per_lr
    result["wall_s"] = time.time() - start

    lines = [
        f"Escape from 0 at equal lr (LoRA+: equal base lr, B at 16x). k={args.k}/class, seeds {args.seeds}, linear "
        f"decay over {args.schedule_steps} steps, first {args.steps} steps. Training loss = mean of the 3 steps up to "
        "step s (mean ± std over seeds); ‖ΔW‖ = mean ||scaling·BA||_F over adapted layers (seed mean).",
        "",
        "| dataset | lr | method | "
        + " | ".join(f"loss @{s}" for s in report_at)
        + " | "
        + " | ".join(f"‖ΔW‖ @{s}" for s in report_at)
        + " |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in report_at * 2) + " |",
    ]
    for name, per_lr in result["datasets"].items():
        for lr, per_method in per_lr.items():
            for method, res in per_method.items():
                at = res["at"]
                lines.append(
                    f"| {name} | {float(lr):g} | {METHOD_LABELS[method]} | "
                    + " | ".join(f"{at[s]['loss_mean']:.3f} ± {at[s]['loss_std']:.3f}" for s in report_at)
                    + " | "
                    + " | ".join(f"{at[s]['delta_norm_mean']:.3f}" for s in report_at)
                    + " |"
                )
    table = "\n".join(lines) + f"\n\nWall time {result['wall_s'] / 60:.1f} min.\n"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "allora_escape")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
