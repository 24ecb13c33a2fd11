"""Collect the GARDO testbed study into committed artefacts: results table, matched-proxy comparison, step time.

    python bench/gardo_report.py [--study bench/out/gardo_testbed] [--step_time bench/results/gardo_step_time.json]

Reads `<study>/results.json` (written by `regtune study gardo`), compares every method with the no-KL run at the
same proxy reward (the no-KL seed-mean curve of true metric and diversity against proxy reward, interpolated at the
method's final proxy reward), and writes `bench/results/gardo_testbed.md` plus `docs/img/gardo_curves.png` and
`docs/img/gardo_samples.png` (copies of the study's plots, if present).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import numpy as np


def seed_mean_curve(res: dict, key: str) -> tuple[list[float], list[float]]:
    curves = [[r for r in c if r.get(key) is not None] for c in res["curves"].values()]
    curves = [c for c in curves if c]
    n = min(len(c) for c in curves)
    xs = [float(np.mean([c[i]["eval_proxy_reward"] for c in curves])) for i in range(n)]
    ys = [float(np.mean([c[i][key] for c in curves])) for i in range(n)]
    return xs, ys


def at_proxy(res: dict, key: str, proxy: float) -> float | None:
    """`key` of a run's seed-mean trajectory where its proxy reward first reaches `proxy` (linear interpolation)."""
    xs, ys = seed_mean_curve(res, key)
    for i in range(1, len(xs)):
        if xs[i - 1] < proxy <= xs[i]:
            t = (proxy - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return None


DIAGNOSTICS = ("clip_fraction", "approx_kl", "gated_fraction", "kl")


def diagnostics_table(study: str, methods: list[str], seeds: list[str] | None = None) -> list[str]:
    """The mechanism's diagnostics per method: means over epochs and seeds (from each run's metrics.jsonl)."""
    rows = []
    for method in methods:
        runs = []
        dirs = sorted(glob.glob(os.path.join(study, method, "seed*")))
        for seed_dir in [d for d in dirs if seeds is None or os.path.basename(d)[4:] in seeds]:
            path = os.path.join(seed_dir, "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    records = [json.loads(line) for line in f if line.strip()]
                runs.append([r for r in records if r.get("epoch", 0) > 0 and "reward" in r])
        runs = [r for r in runs if r]
        if not runs:
            continue
        means = {k: float(np.mean([np.mean([r[k] for r in run if k in r]) for run in runs])) for k in DIAGNOSTICS}
        refreshes = float(np.mean([run[-1].get("refreshes", 0) for run in runs]))
        steps = runs[0][-1].get("optimizer_steps", "n/a")
        rows.append(
            f"| {method} | {means['clip_fraction']:.3f} | {means['approx_kl']:.2e} | {means['gated_fraction']:.3f} | "
            f"{means['kl']:.2e} | {refreshes:.1f} | {steps} |"
        )
    if not rows:
        return []
    return [
        "## The mechanism's diagnostics (mean over epochs and seeds)",
        "",
        "| method | clip fraction | approx KL | gated fraction | gated KL | refreshes (run total) | optimizer steps / epoch |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The gated fraction is the gate's size in every run (it is applied only by kl_mode=gated); the KL is the mean "
        "per-step KL over the samples under it (kl_all: every sample).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="bench/out/gardo_testbed")
    parser.add_argument(
        "--step_time",
        default="bench/results/gardo_step_time.json",
        help="step-time JSON of the retired gardo_step_time bench (section skipped if absent)",
    )
    parser.add_argument("--reference", default="no_kl")
    parser.add_argument("--out", default="bench/results/gardo_testbed.md")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument(
        "--img_prefix", default="gardo", help="plots are copied to <img>/<prefix>_{curves,samples}.png"
    )
    parser.add_argument("--title", default="GARDO on the offline testbed")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds of the diagnostics (default: all found)")
    args = parser.parse_args()
    with open(os.path.join(args.study, "results.json")) as f:
        results = {"methods": {r["method"]: r for r in json.load(f)["results"]}}
    with open(os.path.join(args.study, "results.md")) as f:
        table = f.read().strip()
    ref = results["methods"][args.reference]
    lines = [f"# {args.title}", "", "## Final held-out evaluation (epoch 100)", "", table, ""]
    seeds = args.seeds.split(",") if args.seeds else None
    lines += diagnostics_table(args.study, list(results["methods"]), seeds)
    lines += [
        "## At matched proxy reward",
        "",
        f"The {args.reference} run's seed-mean trajectory, interpolated where its proxy reward first reaches each "
        "method's final (seed-mean) proxy reward: higher true metric / diversity than it = a better trade-off.",
        "",
        f"| method | final proxy | true metric | {args.reference} at that proxy | diversity (L2) | "
        f"{args.reference} at that proxy |",
        "|---|---|---|---|---|---|",
    ]
    for method, res in results["methods"].items():
        if method == args.reference:
            continue
        f = res["final"]
        proxy = f["eval_proxy_reward"]["mean"]
        ref_true = at_proxy(ref, "eval_class_prob", proxy)
        ref_div = at_proxy(ref, "eval_diversity_l2", proxy)

        def show(v, fmt):
            return "not reached" if v is None else format(v, fmt)

        lines.append(
            f"| {method} | {proxy:.4f} | {f['eval_class_prob']['mean']:.3f} | {show(ref_true, '.3f')} | "
            f"{f['eval_diversity_l2']['mean']:.2f} | {show(ref_div, '.2f')} |"
        )
    if os.path.exists(args.step_time):
        with open(args.step_time) as f:
            st = json.load(f)
        lines += [
            "",
            "## Step time",
            "",
            f"{st['date']}, {st['machine']}; batch {st['batch']} x {st['sampling_steps']} SDE steps, "
            f"{st['gated_samples']} gated samples ({st['gate_fraction']:.0%} gate), {st['rounds']} interleaved rounds.",
            "",
            "| mode | median optimisation step (s) | median epoch (s) |",
            "|---|---|---|",
        ]
        for m in st["median_step_s"]:
            lines.append(f"| {m} | {st['median_step_s'][m]:.3f} | {st['median_epoch_s'][m]:.3f} |")
        lines += [
            "",
            f"Paired median ratio, optimisation step, gated / KL-on-all: **{st['step_ratio_gated_over_all']:.3f}** "
            f"(goal <= 0.85); no KL / KL-on-all: {st['step_ratio_none_over_all']:.3f}; whole epoch (with sampling "
            f"and rewards) gated / KL-on-all: {st['epoch_ratio_gated_over_all']:.3f}.",
        ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.makedirs(args.img, exist_ok=True)
    for name in ("curves", "samples"):
        src = os.path.join(args.study, f"{name}.png")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(args.img, f"{args.img_prefix}_{name}.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
