"""Step time and peak memory of ALLoRA vs peft LoRA on all-MiniLM-L6-v2 (sequence classification, 2 labels).

Every method adapts `["query", "key", "value", "dense"]` (the 36 linear layers of the encoder and the CLS pooler's
dense layer) with rank 8. All models are built in one process and measured *interleaved*: every round runs one training step
(forward + backward + AdamW step + zero_grad) of each model, in an order rotated from round to round, so that
machine noise (other processes on shared cores, frequency changes) hits every model alike. Reported: the median
step time over the rounds and, for each method, the median over rounds of the *paired* ratio
t(method) / t(LoRA) of the same round (more robust to slow drifts of the machine than the ratio of medians).

Peak memory of one training step (measured after the timing, in a separate, untimed step per model):
  * CPU: every allocation and free of the CPU tensor allocator during the step, as recorded by
    `torch.profiler.profile(profile_memory=True)` (the raw allocation events, in time order, summed up); the peak
    of that running sum is the largest amount of tensor memory the step holds on top of what was live at the step
    start (activations saved for backward, gradients, optimizer temporaries, ALLoRA's coefficients and the
    update-side optimizer's snapshot of A and B). The memory live at the step start (parameters, buffers, optimizer
    state) is counted from the tensors themselves. `tracemalloc` would see none of this (torch does not allocate
    through Python's allocator), and max RSS mostly measures the interpreter, libraries and weights.
  * CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus `memory_allocated()` at the
    step start.

Usage:
    python bench/allora_step_time.py                          # CPU, fp32, batch 16 x 64 tokens, 30 rounds
    python bench/allora_step_time.py --device cuda --dtype bf16 --batch-size 64 --seq-len 128

Writes bench/out/allora_step_time[_<device>_<dtype>].json and .md, and prints the table. No timing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import time
import weakref

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import regtune  # noqa: E402
from bench._common import DATA_DIR, OUT_DIR, TARGET_MODULES, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from regtune.regularizers import ALLoRADiagnostics  # noqa: E402
from regtune.tuners.allora.layer import _Registry  # noqa: E402


METHODS = {
    "lora": "LoRA (peft; alpha 16, dropout 0)",
    "lora_dropout": "LoRA (peft; alpha 16, dropout 0.1)",
    "allora_gradient": "ALLoRA gradient-side (eta 2)",
    "allora_update": "ALLoRA update-side (eta 2, create_allora_optimizer)",
    "allora_factors": "ALLoRA gradient-side, factor rows (eta 2)",
    "allora_per_forward": "ALLoRA gradient-side, coefficient recomputed in every forward (the former behaviour)",
}
BASELINE = "lora"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(method: str, *, device: str, dtype: torch.dtype, r: int = 8, lr: float = 1e-3, seed: int = 0):
    """Return `(peft_model, optimizer)` for one method; the same base weights and seed for every method."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, dtype=dtype)
    if method in ("lora", "lora_dropout"):
        config = peft.LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.1 if method == "lora_dropout" else 0.0,
            target_modules=TARGET_MODULES,
            task_type="SEQ_CLS",
        )
    elif method in ("allora_gradient", "allora_update", "allora_factors", "allora_per_forward"):
        config = regtune.ALLoRAConfig(
            r=r,
            eta=2.0,
            coefficient_on="update" if method == "allora_update" else "gradient",
            row_norm="factors" if method == "allora_factors" else "product",
            target_modules=TARGET_MODULES,
            task_type="SEQ_CLS",
        )
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    model = peft.get_peft_model(base, config).to(device)
    model.train()
    if method == "allora_per_forward":  # the former behaviour: each layer computes its coefficient in every forward
        layers = [m for m in model.modules() if isinstance(m, regtune.tuners.allora.ALLoRALayer)]
        for layer in layers:
            _Registry.groups.pop(layer, None)  # no batched computation across layers
        model.register_forward_pre_hook(lambda *_: [layer.allora_clear_cache() for layer in layers] and None)
    if method == "allora_update":
        optimizer = regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return model, optimizer


def make_batch(batch_size: int, seq_len: int, device: str) -> dict:
    """A fixed batch of real SST-2 sentences, padded/truncated to exactly `seq_len` tokens."""
    with open(os.path.join(DATA_DIR, "sst2", "train.tsv"), newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    # prefer long sentences so that truncation, not padding, fills most of the 64 tokens
    rows = sorted(rows[:2000], key=lambda row: -len(row[0]))[:batch_size]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    enc = tokenizer(
        [row[0] for row in rows], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    enc["labels"] = torch.tensor([int(row[1]) for row in rows])
    return {k: v.to(device) for k, v in enc.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_step(model, optimizer, batch, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    train_step(model, optimizer, batch)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def persistent_bytes(model, optimizer) -> dict:
    """Bytes of parameters + buffers (unique storages) and of the optimizer state, live between steps."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "weights_bytes": _tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "trainable_bytes": _tensor_bytes(trainable),
        "optimizer_state_bytes": _tensor_bytes(state),
    }


def _cpu_step_peak(model, optimizer, batch) -> int:
    """Peak of (allocated - freed) CPU tensor bytes during one step, from the profiler's raw allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, batch)

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocation events; cannot measure memory")
    events.sort()
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak


def step_peak_bytes(model, optimizer, batch, device: str) -> int:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        train_step(model, optimizer, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_step_peak(model, optimizer, batch)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    quiet_transformers()
    machine = machine_description(args.device)  # before the work: it records the load average at the start
    dtype = DTYPES[args.dtype]
    methods = args.methods
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    batch = make_batch(args.batch_size, args.seq_len, args.device)
    built = {m: build(m, device=args.device, dtype=dtype, r=args.r) for m in methods}
    trainable = {m: sum(p.numel() for p in built[m][0].parameters() if p.requires_grad) for m in methods}

    for _ in range(args.warmup):
        for m in methods:
            timed_step(*built[m], batch, args.device)
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    for rnd in range(args.rounds):
        shift = rnd % len(methods)
        for m in methods[shift:] + methods[:shift]:
            wall, cpu = timed_step(*built[m], batch, args.device)
            times[m].append(wall)
            cpu_times[m].append(cpu)

    # cost of ALLoRA's c/eta diagnostic (computed only when the Trainer logs), measured right after a step, as with
    # logging_steps=1 (the worst case). "cold": it computes the coefficients of the stepped weights, which the next
    # forward (gradient side) or optimizer step (update side) then reuses from the cache; "warm": what it adds on top.
    diagnostics, diagnostics_warm = {}, {}
    diagnostics_regularizer = ALLoRADiagnostics()
    for m in methods:
        if not m.startswith("allora"):
            continue
        diagnostics_regularizer._model, diagnostics_regularizer._adapters = weakref.ref(built[m][0]), None
        cold, warm = [], []
        for _ in range(max(5, args.rounds // 3)):
            train_step(*built[m], batch)
            for samples in (cold, warm):
                _sync(args.device)
                start = time.perf_counter()
                diagnostics_regularizer.diagnostics()  # what the Trainer's `log` calls
                samples.append(time.perf_counter() - start)
        diagnostics[m], diagnostics_warm[m] = statistics.median(cold), statistics.median(warm)

    memory = {}
    for m in methods:
        model, optimizer = built[m]
        memory[m] = {"step_peak_bytes": step_peak_bytes(model, optimizer, batch, args.device)}
        memory[m].update(persistent_bytes(model, optimizer))
        memory[m]["total_peak_bytes"] = (
            memory[m]["weights_bytes"] + memory[m]["optimizer_state_bytes"] + memory[m]["step_peak_bytes"]
        )

    base_t, base_cpu = times[BASELINE], cpu_times[BASELINE]
    rows = []
    for m in methods:
        t, cpu = times[m], cpu_times[m]
        paired = [a / b for a, b in zip(t, base_t)]
        paired_cpu = [a / b for a, b in zip(cpu, base_cpu)]
        q = statistics.quantiles(t, n=4)
        pq = statistics.quantiles(paired, n=4)
        rows.append(
            {
                "method": m,
                "label": METHODS[m],
                "trainable_params": trainable[m],
                "median_step_s": statistics.median(t),
                "iqr_step_s": [q[0], q[2]],
                "ratio_of_medians": statistics.median(t) / statistics.median(base_t),
                "median_paired_ratio": statistics.median(paired),
                "paired_ratio_iqr": [pq[0], pq[2]],
                "diagnostics_s": diagnostics.get(m),
                "diagnostics_fraction_of_step": (diagnostics[m] / statistics.median(t) if m in diagnostics else None),
                "diagnostics_warm_s": diagnostics_warm.get(m),
                "diagnostics_warm_fraction_of_step": (
                    diagnostics_warm[m] / statistics.median(t) if m in diagnostics_warm else None
                ),
                "median_cpu_step_s": statistics.median(cpu),
                "median_paired_cpu_ratio": statistics.median(paired_cpu),
                "step_peak_MiB": memory[m]["step_peak_bytes"] / 2**20,
                "total_peak_MiB": memory[m]["total_peak_bytes"] / 2**20,
                "step_peak_ratio": memory[m]["step_peak_bytes"] / memory[BASELINE]["step_peak_bytes"],
                "total_peak_ratio": memory[m]["total_peak_bytes"] / memory[BASELINE]["total_peak_bytes"],
                "memory_bytes": memory[m],
                "step_times_s": t,
                "step_cpu_times_s": cpu,
            }
        )
    return {
        "bench": "allora_step_time",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (AutoModelForSequenceClassification, num_labels=2)",
        "target_modules": TARGET_MODULES,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "tag")},
        "machine": machine,
        "memory_method": (
            "cuda max_memory_allocated above the step start"
            if args.device.startswith("cuda")
            else "torch.profiler(profile_memory=True) raw CPU allocation events: peak of the running sum during one step"
        ),
        "rows": rows,
    }


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.2f}"


def _cold_warm(row: dict) -> str:
    if row["diagnostics_fraction_of_step"] is None:
        return ""
    return f"{_percent(row['diagnostics_fraction_of_step'])} / {_percent(row['diagnostics_warm_fraction_of_step'])}"


def markdown(result: dict) -> str:
    cfg, mach = result["config"], result["machine"]
    where = mach.get("gpu") or f"{mach['cpu']}, {cfg['threads']} torch threads"
    lines = [
        f"Step time and peak memory, r={cfg['r']}, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, "
        f"{cfg['device']} {cfg['dtype']} ({where}); {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up "
        f"rounds; {mach['date']}.",
        "",
        "| method | trainable params | median step (ms) | time ratio vs LoRA (paired median) | paired ratio IQR "
        "| ratio of medians | CPU-time ratio (paired median) | c/eta diagnostic, cold / warm (% of a step) "
        "| step peak mem (MiB) "
        "| step peak ratio | total peak (MiB) | total peak ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['label']} | {row['trainable_params']:,} | {1000 * row['median_step_s']:.1f} "
            f"| {row['median_paired_ratio']:.3f} "
            f"| {row['paired_ratio_iqr'][0]:.3f}-{row['paired_ratio_iqr'][1]:.3f} | {row['ratio_of_medians']:.3f} "
            f"| {row['median_paired_cpu_ratio']:.3f} "
            f"| {_cold_warm(row)} "
            f"| {row['step_peak_MiB']:.1f} "
            f"| {row['step_peak_ratio']:.3f} | {row['total_peak_MiB']:.1f} | {row['total_peak_ratio']:.3f} |"
        )
    lines += [
        "",
        "Time ratios: wall-clock step time relative to LoRA (dropout 0) in the same round, median over rounds; the "
        "CPU-time ratio uses the process CPU time of the step instead (less sensitive to other processes on shared "
        "cores when --threads 1; with several threads it also counts spin-waiting).",
        f"Load average at start: {mach.get('load_avg_at_start')}, at end: {result.get('load_avg_at_end')}.",
        "Step peak: tensor memory held during one forward+backward+AdamW step on top of what was live before it "
        f"({result['memory_method']}). Total peak: step peak + weights/buffers + optimizer state.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the base model weights")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (one step per method each)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--tag", default="", help="output file suffix")
    args = parser.parse_args(argv)

    start = time.time()
    result = run(args)
    result["wall_s"] = time.time() - start
    result["load_avg_at_end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if (args.device, args.dtype) == ("cpu", "fp32") else f"_{args.device.replace(':', '')}_{args.dtype}"
    stem = os.path.join(args.out, f"allora_step_time{suffix}" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
