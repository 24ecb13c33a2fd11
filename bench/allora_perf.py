"""ALLoRA's step-time overhead over peft LoRA, measured as the performance suite measures it (`bench/perf.py`), with
more rounds and only the variants that matter for ALLoRA, so that the paired ratio is tight enough to read a few
percent.

The variants are those of the suite's `lora` group (peft LoRA r 8; ALLoRA eta 2, r 8, coefficient on the gradient
and on the update, each with its diagnostics on and off), trained by `RegTrainer` with `logging_steps=1` on the
suite's Llama, interleaved round by round in one process (see `bench/perf.py`: `time_group`).

    OMP_NUM_THREADS=1 python -m bench.allora_perf                       # small and real width, 4x16 and 16x64
    OMP_NUM_THREADS=1 python -m bench.allora_perf --widths small --sizes 4x16 --rounds 60

Writes one JSON per (width, size) to `bench/results/allora_perf/` (or `--out`; the committed runs of 2026-12-01 are
in its `before/` and `after/` folders: the code before and after the per-step cost work of issue 17, run back to back
with `--rounds 40`), skipped when present (resumable), and
prints the table: the time ratio to LoRA (wall and thread CPU time, median of paired ratios and 25-75% spread), the
diagnostics on/off ratio and the diagnostics read-out as a share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import perf_variants  # noqa: E402
from bench._common import machine_description, quiet_transformers  # noqa: E402
from bench.perf import time_group  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
GROUP = "allora-only"
VARIANTS = [
    "lora",
    "allora (gradient)",
    "allora (gradient) [diag off]",
    "allora (update)",
    "allora (update) [diag off]",
]


def _register_group() -> None:
    by_name = {v.name: v for v in perf_variants.GROUPS["lora"]}
    perf_variants.GROUPS[GROUP] = [by_name[name] for name in VARIANTS]


def _fmt(q: dict | None, digits: int = 3) -> str:
    if not q:
        return ""
    return f"{q['median']:.{digits}f} ({q['q25']:.{digits}f}-{q['q75']:.{digits}f})"


def table(results: dict) -> str:
    lines = [
        "| method | width | batch | step (ms) | time ratio | CPU-time ratio | diag on/off (CPU) | diag read-out (%) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, rows in results.items():
        width, size = key.split("/")
        for name, row in rows.items():
            if name == "lora" or name.endswith("[diag off]") or "error" in row:
                continue
            frac = row.get("diag_log_fraction")
            lines.append(
                f"| {name} | {width} | {size} | {1000 * row['step_s']['median']:.1f} | {_fmt(row.get('time_ratio'))} "
                f"| {_fmt(row.get('cpu_ratio'))} | {_fmt(row.get('diag_on_off_cpu_ratio'))} "
                f"| {'' if frac is None else f'{100 * frac:.2f}'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", default=["small", "real"], choices=["tiny", "small", "real"])
    parser.add_argument("--sizes", nargs="+", default=["4x16", "16x64"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "allora_perf"))
    parser.add_argument("--force", action="store_true", help="rerun the settings whose JSON exists")
    args = parser.parse_args(argv)
    quiet_transformers()
    _register_group()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for width in args.widths:
        for size in args.sizes:
            path = os.path.join(args.out, f"{width}_{size}.json")
            if os.path.exists(path) and not args.force:
                with open(path) as f:
                    results[f"{width}/{size}"] = json.load(f)["rows"]
                continue
            start = time.time()
            rows = time_group(GROUP, width, size, args.warmup, args.rounds, print)
            payload = {
                "width": width,
                "size": size,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "wall_s": time.time() - start,
                "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "machine": machine_description("cpu"),
                "rows": rows,
            }
            with open(path, "w") as f:
                json.dump(payload, f, indent=1)
            results[f"{width}/{size}"] = rows
            print(f"{width} {size}: {time.time() - start:.0f} s", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
