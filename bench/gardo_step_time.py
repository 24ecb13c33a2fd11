"""Step time of GARDO's gated KL (reference outputs for the gated samples only) vs the KL on every sample.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python -m bench.gardo_step_time [--rounds 30] [--gate 0.1]

On the offline testbed (regtune.diffusion.testbed, pretrained model cached), three GARDOTrainers share the same
pretrained denoiser weights: `kl_mode="gated"` with a fixed gated fraction (default 10%), `kl_mode="all"` and
`kl_mode="none"`. Each round times one optimisation phase (`_train_on`: per-step policy forward/backward, reference
forwards, optimizer step) of each mode on its own rollout batch of the same size, in a shuffled order; the goal is
the paired median ratio gated / all <= 0.85. A whole epoch (rollout + rewards + optimisation) is timed the same way.
Writes bench/out/gardo_step_time.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time

import torch

from regtune.diffusion import GARDOConfig, GARDOTrainer  # noqa: E402
from regtune.diffusion.testbed import TestbedConfig, build_testbed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--gate", type=float, default=0.1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bed = build_testbed(TestbedConfig())
    info = bed.pop("info")
    base = bed.pop("denoiser")
    common = dict(
        prompts_per_epoch=args.prompts,
        num_generations=args.generations,
        num_inference_steps=args.steps,
        lora_r=4,
        lora_alpha=8,
        eval_every=0,
        resume=False,
        ref_kl_threshold=None,
        ref_refresh_every=None,
    )
    modes = {
        "gated": dict(
            kl_mode="gated",
            gate_init=args.gate,
            gate_min=args.gate,
            gate_max=args.gate,
            adaptive_gate=False,
            gate_fraction_of="batch",  # --gate is a fraction of the whole batch here
        ),
        "all": dict(kl_mode="all"),
        "none": dict(kl_mode="none"),
    }
    trainers = {
        m: GARDOTrainer(
            GARDOConfig(output_dir=os.path.join(args.out, f"step_time_{m}"), **common, **kw),
            denoiser=copy.deepcopy(base),
            **bed,
        )
        for m, kw in modes.items()
    }
    batches = {m: t._rollout(0) for m, t in trainers.items()}
    gated = int(batches["gated"]["gate_global"].sum())
    for m, t in trainers.items():  # warm-up
        t._train_on(batches[m])
    step = {m: [] for m in modes}
    epoch = {m: [] for m in modes}
    order = list(modes)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for m in order:
            t0 = time.perf_counter()
            trainers[m]._train_on(batches[m])
            step[m].append(time.perf_counter() - t0)
        rng.shuffle(order)
        for m in order:
            t0 = time.perf_counter()
            b = trainers[m]._rollout(r + 1)
            trainers[m]._train_on(b)
            epoch[m].append(time.perf_counter() - t0)

    def ratio(d, a, b):
        return statistics.median(x / y for x, y in zip(d[a], d[b]))

    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.prompts * args.generations,
        "sampling_steps": args.steps,
        "gate_fraction": args.gate,
        "gated_samples": gated,
        "rounds": args.rounds,
        "testbed": info,
        "median_step_s": {m: statistics.median(v) for m, v in step.items()},
        "median_epoch_s": {m: statistics.median(v) for m, v in epoch.items()},
        "step_ratio_gated_over_all": ratio(step, "gated", "all"),
        "step_ratio_none_over_all": ratio(step, "none", "all"),
        "epoch_ratio_gated_over_all": ratio(epoch, "gated", "all"),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gardo_step_time.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = [
        f"# GARDO step time ({result['date']}, {result['machine']})",
        "",
        f"Batch {result['batch']} samples x {args.steps} SDE steps; gated: {gated} samples ({args.gate:.0%} gate); "
        f"{args.rounds} interleaved rounds, paired median ratios.",
        "",
        "| mode | median optimisation step (s) | median epoch (s) |",
        "|---|---|---|",
    ]
    for m in modes:
        md.append(f"| {m} | {result['median_step_s'][m]:.3f} | {result['median_epoch_s'][m]:.3f} |")
    md += [
        "",
        f"step time gated / KL-on-all: **{result['step_ratio_gated_over_all']:.3f}** "
        f"(no KL / KL-on-all: {result['step_ratio_none_over_all']:.3f}); "
        f"whole epoch gated / KL-on-all: {result['epoch_ratio_gated_over_all']:.3f}",
    ]
    with open(os.path.join(args.out, "gardo_step_time.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
