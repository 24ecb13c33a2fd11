"""One performance suite: step time and peak memory of every regtune method against its baseline.

    OMP_NUM_THREADS=1 python -m bench.perf            # the full suite (two widths, two batch sizes)
    OMP_NUM_THREADS=1 python -m bench.perf --quick    # a smoke run: tiny models, few rounds
    python -m bench.perf --groups lora --widths small --sizes 4x16   # a part

Methods (each against its baseline, each trained through regtune's shipped trainer or regularizer):

- ALLoRA, coefficient on the gradient and on the update (RegTrainer), GLAD (GLADTrainer), multi-sample dropout K=8
  (RegTrainer + MultiSampleDropout on the LM head) vs peft LoRA r=8 (RegTrainer);
- mask tuning without and with gradient dropout (MaskTuningTrainer), GLAD on full fine-tuning (RegTrainer +
  GLADRegularizer) vs full fine-tuning of the same weights (RegTrainer);
- LfU perturb, perturb with the same batch, RepS (LfUTrainer) vs trl's SFTTrainer, LoRA r=8 for all;
- GARDO with the gated KL vs the KL on every sample (GARDOTrainer's optimisation phase, on the diffusion testbed).
- ELR and PS-KD, and ELR with `buffer_device="cpu"` (RegTrainer) vs plain cross-entropy (the same RegTrainer without
  them), on a Llama sequence classifier (100 classes, 50,000 indexed rows): `--groups noisy`, not in the default run.

Each method with its mechanism diagnostics on (logged at every step: their worst case) and off
(`Regularizer.log_diagnostics = False` on every regularizer of the trainer). Models: a Llama built from a config at
two widths (see `perf_variants.WIDTHS`), batches of 4 x 16 and 16 x 64 tokens.

Step time: all variants of a group run in one process, each in its own `Trainer.train()` (a thread per trainer; a
callback hands the turn from trainer to trainer, so exactly one computes at any time), one optimizer step per variant
per round, the order rotated every round. A step is timed from one `on_step_begin` to the next, so it includes the
logging (and the diagnostics) of the step. Reported: the median over rounds of the paired ratio
t(method) / t(baseline) of the same round and its 25-75% spread, the same for the thread's CPU time, and the paired
ratio with the diagnostics on vs off.

Peak memory: every variant in a fresh process (forked from a server that has only imported the libraries), one step
after a warm-up step; see `perf_memory.py`.

Writes `bench/results/perf.json` and `bench/results/perf.md` (or `--out`); `--quick` writes `perf_quick.*`. With
`--docs docs/performance.md` the tables also replace the text between that page's marker lines; `--report-only`
rebuilds the tables (and the page) from the JSON without measuring.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads crawl on shared cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the profiler warns about blocks allocated before it started
HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bench._common import machine_description, quiet_transformers  # noqa: E402


# rounds per batch size: a 4 x 16 step takes milliseconds and 16 x 64 one a tenth of a second to a second; both get
# enough rounds for the spread of a ratio near 1 to be read to a few percent on this noisy machine
FULL = dict(widths=["small", "real"], sizes=["4x16", "16x64"], rounds={"4x16": 41, "16x64": 21}, warmup=1)
QUICK = dict(widths=["tiny"], sizes=["4x16", "16x64"], rounds=2, warmup=1)


# ---- step time ----


class Baton(TrainerCallback):
    """Lets a trainer run one optimizer step each time `go` is released; times it (wall and thread CPU time)."""

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.ready = threading.Event()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.error: BaseException | None = None
        self._t0 = None

    def _close(self):
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.thread_time() - self._c0)
            self._t0 = None
            self.done.release()

    def on_step_begin(self, args, state, control, **kwargs):
        self._close()
        self.ready.set()
        self.go.acquire()
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def on_train_end(self, args, state, control, **kwargs):
        self._close()


def _run(trainer, baton: Baton):
    try:
        trainer.train()
    except BaseException as err:  # noqa: BLE001 - handed to the main thread
        baton.error = err
        baton.ready.set()
        baton.done.release()


def quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "n": len(values)}


def paired(a: list[float], b: list[float]) -> dict:
    return quantiles([x / y for x, y in zip(a, b)])


def rounds_for(rounds: int | dict, size: str) -> int:
    """The number of timed rounds at `size` (`rounds`: one number for all sizes, or one per size)."""
    return rounds if isinstance(rounds, int) else rounds.get(size, max(rounds.values()))


def time_group(group: str, width: str, size: str, warmup: int, rounds: int, log) -> dict:
    from bench.perf_variants import GROUPS, buffer_bytes, build_trainer

    variants = GROUPS[group]
    batch, seq_len = (int(x) for x in size.split("x"))
    steps = warmup + rounds + 1  # the last step closes at the end of training: not counted
    batons, threads, errors, log_times, refresh_times, buffers = {}, [], {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            try:
                trainer = build_trainer(v, width, tmp, batch, seq_len, steps)
            except Exception as err:  # noqa: BLE001
                errors[v.name] = f"{type(err).__name__}: {err}"
                log(f"  {v.name}: build failed: {errors[v.name]}")
                continue
            baton = Baton()
            trainer.add_callback(baton)
            thread = threading.Thread(target=_run, args=(trainer, baton), daemon=True, name=v.name)
            thread.start()
            baton.ready.wait()
            if baton.error is not None:
                errors[v.name] = f"{type(baton.error).__name__}: {baton.error}"
                log(f"  {v.name}: failed: {errors[v.name]}")
                continue
            batons[v.name] = baton
            threads.append(thread)
            log_times[v.name] = getattr(trainer, "_perf_log_times", None)
            refresh_times[v.name] = getattr(trainer, "_perf_refresh_times", None)
            buffers[v.name] = buffer_bytes(trainer)  # the per-example buffers, made at the start of train()
            del trainer
        names = list(batons)
        for r in range(steps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                baton = batons[name]
                if baton.error is not None:
                    continue
                baton.go.release()
                baton.done.acquire()
                if baton.error is not None:
                    errors[name] = f"{type(baton.error).__name__}: {baton.error}"
                    log(f"  {name}: failed at step {r}: {errors[name]}")
        for thread in threads:
            thread.join(timeout=60)
    times = {n: b.times[warmup : warmup + rounds] for n, b in batons.items() if n not in errors}
    cpu = {n: b.cpu_times[warmup : warmup + rounds] for n, b in batons.items() if n not in errors}
    out = {}
    for v in variants:
        if v.name not in times:
            out[v.name] = {"error": errors.get(v.name, "not run")}
            continue
        row = {"step_s": quantiles(times[v.name]), "cpu_step_s": quantiles(cpu[v.name])}
        if v.baseline in times and v.name != v.baseline:
            row["time_ratio"] = paired(times[v.name], times[v.baseline])
            row["cpu_ratio"] = paired(cpu[v.name], cpu[v.baseline])
        off = v.name + " [diag off]"
        if v.diagnostics is True and off in times:
            row["diag_on_off_ratio"] = paired(times[v.name], times[off])
            row["diag_on_off_cpu_ratio"] = paired(cpu[v.name], cpu[off])
        if v.diagnostics is True and log_times.get(v.name):
            # the diagnostics' read-out when the Trainer logs, alone (the accumulation inside the step is not in it, nor
            # ALLoRA's coefficient refresh that the read-out triggers: it is moved there from the next forward)
            spent = log_times[v.name][warmup : warmup + rounds]
            row["diag_log_s"] = quantiles(spent)
            row["diag_log_fraction"] = statistics.median(spent) / statistics.median(times[v.name])
            # the same read-out once every 10 steps (logging_steps=10; the Trainer's default is 500), per step
            row["diag_log_fraction_every_10"] = row["diag_log_fraction"] / 10
        if v.floor in times:  # the method against its floor: the same passes without the method's own work
            row["time_ratio_vs_floor"] = paired(times[v.name], times[v.floor])
            row["cpu_ratio_vs_floor"] = paired(cpu[v.name], cpu[v.floor])
        if refresh_times.get(v.name):
            # ALLoRA's coefficient refresh (once per optimizer step), alone, as a share of the step
            spent = [refresh_times[v.name].get(s, 0.0) for s in range(warmup, warmup + rounds)]
            row["refresh_s"] = quantiles(spent)
            row["refresh_fraction"] = statistics.median(spent) / statistics.median(times[v.name])
        if buffers.get(v.name):
            row["buffers"] = buffers[v.name]
        out[v.name] = row
    return out


def time_gardo(width: str, size: str, warmup: int, rounds: int, log) -> dict:
    from bench.perf_variants import build_gardo

    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: build_gardo(m, width, size, tmp, cache) for m in ("all", "gated")}
        batches = {m: t._rollout(0) for m, t in trainers.items()}
        times = {m: [] for m in trainers}
        cpu = {m: [] for m in trainers}
        names = list(trainers)
        for r in range(warmup + rounds):
            for m in names[r % 2 :] + names[: r % 2]:
                t0, c0 = time.perf_counter(), time.thread_time()
                trainers[m]._train_on(batches[m])
                if r >= warmup:
                    times[m].append(time.perf_counter() - t0)
                    cpu[m].append(time.thread_time() - c0)
    gated = int(batches["gated"]["gate_global"].sum())
    return {
        "all": {"step_s": quantiles(times["all"]), "cpu_step_s": quantiles(cpu["all"])},
        "gated": {
            "step_s": quantiles(times["gated"]), "cpu_step_s": quantiles(cpu["gated"]),
            "time_ratio": paired(times["gated"], times["all"]), "cpu_ratio": paired(cpu["gated"], cpu["all"]),
            "gated_samples": gated, "batch_samples": int(batches["gated"]["gate_global"].numel()),
        },
    }  # fmt: skip


# ---- peak memory (fresh processes) ----


def memory_pass(jobs: list[tuple], log, timeout: float = 600) -> dict:
    """Run each `(kind, *args)` job in a fresh process forked from a server that imported the libraries once."""
    from bench import perf_memory

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "transformers", "peft", "trl", "diffusers", "regtune", "bench.perf_variants", "bench.perf_memory"]
    )
    results = {}
    for job in jobs:
        start = time.perf_counter()
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=perf_memory.child, args=(send, job), daemon=True)
        child.start()
        send.close()
        try:
            res = receive.recv() if receive.poll(timeout) else {"error": f"no result within {timeout} s"}
        except EOFError:
            child.join(10)
            res = {"error": f"the child process died (exit code {child.exitcode})"}
        child.join(10)
        if child.is_alive():
            child.kill()
        results[job] = res
        what = res.get("error") or f"peak RSS above imports {res['peak_rss_above_imports'] / 2**20:.1f} MiB"
        log(f"  memory {job[1:]}: {what} ({time.perf_counter() - start:.1f} s)")
    return results


def mem_ratios(mem: dict, base: dict) -> dict:
    out = {}
    if "error" in mem or "error" in base:
        return {"error": mem.get("error") or base.get("error")}
    out["rss_ratio"] = mem["peak_rss_above_imports"] / base["peak_rss_above_imports"]
    out["rss_extra_bytes"] = mem["peak_rss_above_imports"] - base["peak_rss_above_imports"]
    # what the step itself adds to the resident memory it starts from (optimizer state etc. excluded)
    rise, base_rise = mem["peak_rss"] - mem["rss_before_step"], base["peak_rss"] - base["rss_before_step"]
    if base_rise > 0:
        out["rss_step_rise_ratio"] = rise / base_rise
    if "tensor_peak" in mem and "tensor_peak" in base:
        out["tensor_ratio"] = mem["tensor_peak"] / base["tensor_peak"]
        out["tensor_extra_bytes"] = mem["tensor_peak"] - base["tensor_peak"]
        if mem.get("trainable_bytes"):
            out["tensor_extra_in_trainable_copies"] = out["tensor_extra_bytes"] / mem["trainable_bytes"]
    return out


# ---- tables ----


def _r(q: dict | None, digits: int = 2) -> str:
    if not q:
        return ""
    return f"{q['median']:.{digits}f} ({q['q25']:.{digits}f}-{q['q75']:.{digits}f})"


def _rounds_text(rounds: int | dict) -> str:
    if isinstance(rounds, int):
        return f"{rounds} interleaved rounds"
    return "interleaved rounds: " + ", ".join(f"{n} at {size}" for size, n in rounds.items())


def markdown(result: dict) -> str:
    cfg, mach = result["config"], result["machine"]
    lines = [
        f"regtune performance suite: {mach['date']}, {mach['cpu']} ({mach['cpu_count']} cores, torch "
        f"{mach['torch']}, {cfg['threads']} thread), `{result['command']}`, {result['wall_s'] / 60:.1f} min; "
        f"{_rounds_text(cfg['rounds'])} after {cfg['warmup']} warm-up step{'' if cfg['warmup'] == 1 else 's'}. "
        "Load average at start/end: "
        f"{', '.join(f'{x:.1f}' for x in mach.get('load_avg_at_start', []))} / "
        f"{', '.join(f'{x:.1f}' for x in result.get('load_avg_at_end', []))}.",
        "",
        *(
            []
            if result.get("complete", True)
            else ["**Partial run: the suite was cut short; the rows below are the measured ones.**", ""]
        ),
        "Time: paired median ratio method / baseline of the same round (25-75% spread), wall clock and the thread's "
        "CPU time, with the diagnostics on (and off). Diagnostics: paired ratio with the diagnostics on / off (wall; CPU), "
        "and their read-out alone as a share of the step (net of ALLoRA's coefficient refresh, which the read-out "
        "moves from the next forward). Memory: the peak resident memory "
        "of one step above the process's memory after the imports, fresh process per variant (RSS), and the peak of "
        "live tensor bytes (weights, optimizer state and the step's allocations; what a GPU's "
        "max_memory_allocated counts), each as method / baseline.",
        "",
        "| method | baseline | width | batch | step (ms) | time ratio | CPU-time ratio | time ratio, diagnostics off "
        "| diagnostics on/off "
        "(wall; CPU) | diagnostics read-out (% of step) "
        "| memory ratio (RSS) | memory ratio (tensors) | extra tensors / trainable |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['baseline']} | {row['width']} | {row['size']} | error: "
                         f"{row['error'][:120]} | | | | | | |")  # fmt: skip
            continue
        mem = row.get("memory", {})
        step = row["step_s"]["median"] * 1000 if row.get("step_s") else float("nan")
        copies = mem.get("tensor_extra_in_trainable_copies")
        cells = [
            row["method"], row["baseline"], row["width"], row["size"], f"{step:.1f}", _r(row.get("time_ratio")),
            _r(row.get("cpu_ratio")),
            _r(row.get("time_ratio_diag_off")),
            f"{_r(row.get('diag_on_off_ratio'), 3)}; {_r(row.get('diag_on_off_cpu_ratio'), 3)}" if row.get("diag_on_off_ratio") else "",
            f"{100 * row['diag_log_fraction']:.2f}" if row.get("diag_log_fraction") is not None else "",
            f"{mem['rss_ratio']:.2f}" if "rss_ratio" in mem else mem.get("error", "")[:80],
            f"{mem['tensor_ratio']:.2f}" if "tensor_ratio" in mem else "",
            f"{copies:.2f}" if copies is not None else "",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += targets_table(result)
    lines += buffers_table(result)
    lines += floors_table(result)
    lines += width_table(result)
    lines += ["", "Baselines (absolute figures):", "", "| baseline | width | batch | step (ms) | peak RSS above imports (MiB) "
              "| tensor peak (MiB) |", "| --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for b in result["baselines"]:
        mem = b.get("memory", {})
        lines.append(
            f"| {b['baseline']} | {b['width']} | {b['size']} | {b['step_s']['median'] * 1000:.1f} | "
            f"{mem.get('peak_rss_above_imports', float('nan')) / 2**20:.1f} | {mem.get('tensor_peak', float('nan')) / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


# the goals: (label, method, figure, limit); figure is a key of a row (a paired ratio) or of its memory
GOALS = [
    ("ALLoRA (gradient) time <= 1.02x LoRA", "allora (gradient)", "time_ratio", 1.02),
    ("ALLoRA (update) time <= 1.02x LoRA", "allora (update)", "time_ratio", 1.02),
    ("GLAD time <= 1.8x LoRA", "glad", "time_ratio", 1.8),
    ("GLAD peak tensors <= LoRA + 1 copy of the trainable params", "glad", "tensor_extra_in_trainable_copies", 1.0),
    ("GLAD (full FT) peak tensors <= full FT + 1 copy", "glad (full-ft)", "tensor_extra_in_trainable_copies", 1.0),
    ("LfU perturb memory <= 1.3x SFT (tensors)", "lfu (perturb)", "tensor_ratio", 1.3),
    ("LfU perturb, same batch, memory <= 1.3x SFT (tensors)", "lfu (perturb, same batch)", "tensor_ratio", 1.3),
    ("LfU RepS memory <= 1.3x SFT (tensors)", "lfu (reps)", "tensor_ratio", 1.3),
    ("mask tuning + GD memory <= 1.3x full FT (tensors)", "mask tuning + gradient dropout", "tensor_ratio", 1.3),
    ("LfU perturb memory <= 1.3x SFT (RSS)", "lfu (perturb)", "rss_ratio", 1.3),
    ("LfU perturb, same batch, memory <= 1.3x SFT (RSS)", "lfu (perturb, same batch)", "rss_ratio", 1.3),
    ("LfU RepS memory <= 1.3x SFT (RSS)", "lfu (reps)", "rss_ratio", 1.3),
    ("mask tuning + GD memory <= 1.3x full FT (RSS)", "mask tuning + gradient dropout", "rss_ratio", 1.3),
]


# goals shown only when their method was run (`--groups noisy`)
NOISY_GOALS = [
    ("ELR time <= 1.05x CE", "elr", "time_ratio", 1.05),
    ("ELR, diagnostics off, time <= 1.05x CE", "elr", "time_ratio_diag_off", 1.05),
    ("ELR, buffer on the CPU, time <= 1.05x CE", "elr (buffer on cpu)", "time_ratio", 1.05),
    ("PS-KD time <= 1.05x CE", "pskd", "time_ratio", 1.05),
    ("PS-KD, diagnostics off, time <= 1.05x CE", "pskd", "time_ratio_diag_off", 1.05),
]


def buffers_table(result: dict) -> list[str]:
    """The per-example buffers (ELR's targets, PS-KD's predictions and visited flags) of each method that has them."""
    rows = [r for r in result["rows"] if r.get("buffers")]
    if not rows:
        return []
    lines = ["", "Per-example buffers (N training rows x C classes; made at the start of training):", "",
             "| method | width | batch | buffer | shape | dtype | device | MiB |", "| --- | --- | --- | --- | --- | --- "
             "| --- | ---: |"]  # fmt: skip
    for r in rows:
        for name, b in r["buffers"].items():
            shape = " x ".join(str(n) for n in b["shape"])
            lines.append(f"| {r['method']} | {r['width']} | {r['size']} | {name} | {shape} | {b['dtype']} | "
                         f"{b['device']} | {b['bytes'] / 2**20:.3f} |")  # fmt: skip
    return lines


def _figure(row: dict, key: str):
    value = row.get(key) or row.get("memory", {}).get(key)
    return value["median"] if isinstance(value, dict) else value


def _per_config_table(rows: list[dict], caption: str, first: str, items: list[tuple], cell, skip_empty=False):
    """A table with one line per `(label, method, key, *extra)` of `items` and one column per (width, batch) of `rows`
    (`first`: the first column's title); `cell(row, key, *extra)` writes a cell."""
    configs = list(dict.fromkeys((r["width"], r["size"]) for r in rows))
    if not configs:
        return []
    lines = [
        "",
        caption,
        "",
        f"| {first} | " + " | ".join(f"{w} {s}" for w, s in configs) + " |",
        "| --- |" + " ---: |" * len(configs),
    ]
    by_config = {(r["method"], r["width"], r["size"]): r for r in rows}
    for label, method, key, *extra in items:
        cells = []
        for width, size in configs:
            row = by_config.get((method, width, size))
            cells.append(cell(row, key, *extra) if row else "")
        if any(cells) or not skip_empty:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _goal_cell(row: dict, key: str, limit: float) -> str:
    value = _figure(row, key)
    if value is None:
        return ""
    share = key.startswith("diag_log_fraction")
    text = f"{100 * value:.1f}%" if share else f"{value:.2f}"
    shown = round(value, 3 if share else 2)  # compared at the precision shown
    return text if shown <= limit else f"**{text}**"


def targets_table(result: dict) -> list[str]:
    rows = result["rows"]
    goals = list(GOALS)
    ran = {r["method"] for r in rows}
    goals += [goal for goal in NOISY_GOALS if goal[1] in ran]
    for method in dict.fromkeys(r["method"] for r in rows if r.get("diag_on_off_cpu_ratio")):
        goals.append((f"{method}: diagnostics on/off (CPU time) <= 1.02", method, "diag_on_off_cpu_ratio", 1.02))
        goals.append((f"{method}: diagnostics read-out <= 2% of the step", method, "diag_log_fraction", 0.02))
        goals.append((f"{method}: the same, logging every 10 steps <= 2%", method, "diag_log_fraction_every_10", 0.02))
    caption = (
        "Goals (the median paired ratio, or the extra tensor memory in copies of the trainable parameters; "
        "**bold**: goal missed, compared at the precision shown):"
    )
    return _per_config_table(rows, caption, "goal", goals, _goal_cell)


def _floor_cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    return _r(value) if isinstance(value, dict) else f"{100 * value:.1f}%"


def floors_table(result: dict) -> list[str]:
    """What each method costs above its floor: GLAD against the same two passes without the perturbation, ALLoRA's
    coefficient refresh (its one per-step cost that LoRA does not have) as a share of its step."""
    rows = result["rows"]
    floors = [r for r in rows if r.get("time_ratio_vs_floor") or r.get("refresh_fraction") is not None]
    if not floors:
        return []
    figures = []
    for method in dict.fromkeys(r["method"] for r in floors):
        figures.append((f"{method}: time / the same two passes without the method", method, "time_ratio_vs_floor"))
        figures.append((f"{method}: coefficient refresh, % of the step", method, "refresh_fraction"))
    for method in dict.fromkeys(r["method"] for r in rows if "two passes" in r["method"]):
        figures.append((f"{method} / {method.split(',')[0]} (one pass)", method, "time_ratio"))
    caption = (
        "Floors (paired median ratios, 25-75% spread; the two-pass rows are the baseline trained with two "
        "micro-batches of the same size per optimizer step):"
    )
    return _per_config_table(rows, caption, "figure", figures, _floor_cell, skip_empty=True)


def width_table(result: dict) -> list[str]:
    """Each ratio (time, CPU time, tensor memory) at every width side by side, per batch size."""
    rows = result["rows"]
    widths = list(dict.fromkeys(r["width"] for r in rows))
    if len(widths) < 2:
        return []
    lines = [
        "",
        "Cost versus model width (median paired ratios; tensor-memory ratio in brackets):",
        "",
        "| method | batch | " + " | ".join(f"{w}: time / CPU time (memory)" for w in widths) + " |",
        "| --- | --- |" + " ---: |" * len(widths),
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        for size in dict.fromkeys(r["size"] for r in rows):
            cells = []
            for width in widths:
                row = next((r for r in rows if (r["method"], r["size"], r["width"]) == (method, size, width)), None)
                if row is None or "time_ratio" not in row:
                    cells.append("")
                    continue
                mem = row.get("memory", {}).get("tensor_ratio")
                cells.append(
                    f"{row['time_ratio']['median']:.2f} / {row['cpu_ratio']['median']:.2f}"
                    + (f" ({mem:.2f})" if mem is not None else "")
                )
            lines.append(f"| {method} | {size} | " + " | ".join(cells) + " |")
    return lines


# ---- main ----


DOCS_BEGIN, DOCS_END = "<!-- bench.perf tables: begin -->", "<!-- bench.perf tables: end -->"


def _write_tables(result: dict, stem: str, docs: str | None) -> None:
    """Write `<stem>.md` and, with `docs`, replace the text between the marker lines of that markdown file."""
    text = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    if docs:
        with open(docs) as f:
            page = f.read()
        if DOCS_BEGIN not in page or DOCS_END not in page:
            raise SystemExit(f"--docs {docs}: the page has no {DOCS_BEGIN!r} ... {DOCS_END!r} lines to replace.")
        head, rest = page.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        with open(docs, "w") as f:
            f.write(f"{head}{DOCS_BEGIN}\n\n{text.strip()}\n\n{DOCS_END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 rounds")
    parser.add_argument("--groups", nargs="+", default=["lora", "full", "sft", "gardo"])
    parser.add_argument("--widths", nargs="+", default=None, choices=["tiny", "small", "real"])
    parser.add_argument("--sizes", nargs="+", default=None, help="batch x tokens, e.g. 4x16 16x64")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="step time only")
    parser.add_argument("--no-time", action="store_true", help="peak memory only")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default=None, help="output file stem (default perf, or perf_quick with --quick)")
    parser.add_argument(
        "--docs",
        default=None,
        help="also write the tables into this markdown file, between the lines "
        f"{DOCS_BEGIN!r} and {DOCS_END!r} (e.g. docs/performance.md)",
    )
    parser.add_argument("--report-only", action="store_true", help="measure nothing: rewrite the tables from the JSON")
    cli = parser.parse_args(argv)
    stem = os.path.join(cli.out, cli.name or ("perf_quick" if cli.quick else "perf"))
    if cli.report_only:
        with open(stem + ".json") as f:
            result = json.load(f)
        _write_tables(result, stem, cli.docs)
        return result
    preset = QUICK if cli.quick else FULL
    for key in ("widths", "sizes", "rounds", "warmup"):
        if getattr(cli, key) is None:
            setattr(cli, key, preset[key])
    torch.set_num_threads(1)
    quiet_transformers()
    from bench.perf_variants import GROUPS

    machine = machine_description("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    timing, memory = {}, {}
    os.makedirs(cli.out, exist_ok=True)

    def write(final: bool) -> dict:
        result = assemble(cli, machine, timing, memory)
        result["complete"] = final
        result["wall_s"] = time.time() - start
        result["load_avg_at_end"] = os.getloadavg()
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1, default=str)
        _write_tables(result, stem, cli.docs if final else None)
        return result

    # one (width, batch) configuration after the other, the results written after each: a run cut short keeps them
    for width in cli.widths:
        for size in cli.sizes:
            jobs = []
            for group in cli.groups:
                if group == "gardo":
                    jobs += [("gardo", m, width, size) for m in ("all", "gated")]
                else:
                    jobs += [("trainer", group, v.name, width, size) for v in GROUPS[group] if v.memory]
            if not cli.no_memory:
                log(f"memory {width} {size}: {len(jobs)} fresh processes")
                memory.update(memory_pass(jobs, log))
            rounds = rounds_for(cli.rounds, size)
            for group in [] if cli.no_time else cli.groups:
                log(f"time: {group} {width} {size}, {rounds} rounds")
                if group == "gardo":
                    timing[(group, width, size)] = time_gardo(width, size, cli.warmup, rounds, log)
                else:
                    timing[(group, width, size)] = time_group(group, width, size, cli.warmup, rounds, log)
                write(final=False)
    result = write(final=True)
    print(markdown(result))
    log(f"wrote {stem}.json and {stem}.md")
    return result


def assemble(cli, machine: dict, timing: dict, memory: dict) -> dict:
    from bench import perf_variants
    from bench.perf_variants import GROUPS

    rows, baselines = [], []
    for group in cli.groups:
        if group == "gardo":
            entries = [("all", "all", "gardo KL on all"), ("gated", "all", "gardo gated KL")]
        else:
            entries = [(v.name, v.baseline, v.method) for v in GROUPS[group] if v.diagnostics is not False]
        for width in cli.widths:
            for size in cli.sizes:
                t = timing.get((group, width, size), {})

                def mem_of(name, group=group, width=width, size=size):
                    key = ("gardo", name, width, size) if group == "gardo" else ("trainer", group, name, width, size)
                    return memory.get(key)

                for name, base, label in entries:
                    base_label = "gardo KL on all" if group == "gardo" else base
                    row = {"group": group, "method": label, "variant": name, "baseline": base_label, "width": width,
                           "size": size, **t.get(name, {})}  # fmt: skip
                    off = t.get(name + " [diag off]", {})
                    if "time_ratio" in off:  # the method with its diagnostics off, against the same baseline
                        row["time_ratio_diag_off"], row["cpu_ratio_diag_off"] = off["time_ratio"], off["cpu_ratio"]
                    m, mb = mem_of(name), mem_of(base)
                    if m is not None:
                        row["memory_raw"] = m
                        if mb is not None and name != base:
                            row["memory"] = mem_ratios(m, mb)
                    if name == base:
                        baselines.append({**row, "baseline": base_label, "memory": m or {}})
                    else:
                        rows.append(row)
    result = {
        "bench": "perf",
        "command": " ".join(["python -m bench.perf", *sys.argv[1:]]),
        "config": {
            **vars(cli),
            "out": os.path.relpath(cli.out, os.path.dirname(HERE)),  # relative to the repository: no machine path
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "machine": machine,
        "models": {
            "llama_widths": perf_variants.WIDTHS,
            "layers": perf_variants.LAYERS,
            "vocab": perf_variants.VOCAB,
            "gardo_testbed_head_dims": perf_variants.GARDO_WIDTHS,
            "gardo_batches": perf_variants.GARDO_SIZES,
            "gardo_gate": perf_variants.GARDO_GATE,
        },
        "rows": rows,
        "baselines": [b for b in baselines if b.get("step_s")],
    }
    return result


if __name__ == "__main__":
    main()
