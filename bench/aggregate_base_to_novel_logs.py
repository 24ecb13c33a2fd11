"""Aggregate the per-seed lines of base-to-novel logs (bench/results/*.log) with bench/results/base_to_novel_zero_shot_lora.json
(zero-shot and LoRA) into a mean +- sample-std table.

    python bench/aggregate_base_to_novel_logs.py bench/results/*.log
"""

import ast
import json
import re
import statistics
import sys


rows = {}
for f in sys.argv[1:]:
    for line in open(f):
        m = re.match(r"\s+(\w+) (\S+) seed (\d+): (\{.*\})", line)
        if m:
            ds, meth, seed, d = m.group(1), m.group(2), int(m.group(3)), ast.literal_eval(m.group(4))
            rows.setdefault((ds, meth), {})[seed] = d
# baselines from helper-4's results.json
base = json.load(open("bench/results/base_to_novel_zero_shot_lora.json"))
for r in base["rows"]:
    for run in r["runs"]:
        rows.setdefault((r["dataset"], r["method"]), {})[run["seed"]] = {
            k: run[k] for k in ("base", "novel", "H", "all")
        }


def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


print("| dataset | method | seeds | base | novel | H |\n|---|---|---|---|---|---|")
for (ds, meth), runs in sorted(rows.items(), key=lambda x: (x[0][0] != "trec", x[0][1])):
    seeds = sorted(runs)
    print(
        f"| {ds} | {meth} | {len(seeds)} | "
        + " | ".join(ms([runs[s][k] for s in seeds]) for k in ("base", "novel", "H"))
        + " |"
    )
print()
print("seed 0 only:\n| dataset | method | base | novel | H |\n|---|---|---|---|---|")
for (ds, meth), runs in sorted(rows.items()):
    if ds == "ag_news" and 0 in runs:
        print(f"| {ds} | {meth} | " + " | ".join(f"{runs[0][k]:.3f}" for k in ("base", "novel", "H")) + " |")
