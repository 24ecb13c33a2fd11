"""GLAD's cost against LoRA (and full fine-tuning), through the shipped trainers: step time and peak tensor memory.

One process, one model per variant (a MiniLM-shaped BERT built from its config: 6 layers, width 384, random
weights), the same batches for every variant. Step time: every round runs one optimizer step of each variant, in an
order rotated every round, and the figure is the median over rounds of the *paired* ratio (variant / baseline of the
same round) with its 25-75% spread. Peak memory: the high-water mark of live tensor bytes during one optimizer step
(from the torch profiler's allocation events), after a warm-up step (optimizer state exists).

    python -m bench.glad_cost --rounds 15                      # batch 16 x 64 tokens and 4 x 16 tokens
    python -m bench.glad_cost --rounds 15 --threads 1 --out bench/out/glad_cost
    python -m bench.glad_cost --skip-timing --masks-steps 10   # only shared vs independent dropout masks

GLAD variants: diagnostics on (default), diagnostics off, independent dropout masks. The diagnostics' own cost is
also timed in isolation (the in-place recovery of cos(g, g_sam) and ||g_sam - g|| / ||g|| on the real parameters).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    TrainingArguments,
)

import regtune  # noqa: E402
from bench._common import OUT_DIR, TARGET_MODULES, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from bench.data import TREC_LABELS, data_path, read_trec  # noqa: E402
from bench.results import write_results  # noqa: E402
from regtune.functional.glad import glad_diagnostics_, glad_perturb_, glad_restore_  # noqa: E402
from regtune.regularizers import GLADRegularizer  # noqa: E402


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2
    )
    return BertForSequenceClassification(config)


def lora(model):
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGET_MODULES))


VARIANTS = {
    # name: (build model, regularizers)
    "lora": (lambda: lora(base_model()), lambda: []),
    "glad": (lambda: lora(base_model()), lambda: [GLADRegularizer(rho=0.05, glad_lambda=0.5)]),
    "glad (diagnostics off)": (
        lambda: lora(base_model()),
        lambda: [GLADRegularizer(rho=0.05, glad_lambda=0.5, log_diagnostics=False)],
    ),
    "glad (independent masks)": (
        lambda: lora(base_model()),
        lambda: [GLADRegularizer(rho=0.05, glad_lambda=0.5, share_dropout_masks=False)],
    ),
    "full": (base_model, lambda: []),
    "full + glad": (base_model, lambda: [GLADRegularizer(rho=0.05, glad_lambda=0.5)]),
}
TIMED = ["lora", "glad", "glad (diagnostics off)", "glad (independent masks)"]


def batches(n_micro: int, batch: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_micro):
        ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))})
    return out


def make_trainer(name: str, out: str, batch: int):
    build, regs = VARIANTS[name]
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, learning_rate=1e-4, report_to="none", use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = regtune.RegTrainer(model=build(), args=args, regularizers=regs())
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def optimizer_step(trainer, micro_batches) -> None:
    for index, batch in enumerate(micro_batches):
        trainer.accelerator.gradient_state._set_sync_gradients(index == len(micro_batches) - 1)
        trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def peak_tensor_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def quantiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "n": len(values)}


def time_suite(rounds: int, batch: int, seq_len: int, tmp: str) -> dict:
    trainers = {name: make_trainer(name, os.path.join(tmp, name), batch) for name in TIMED}
    data = batches(1, batch, seq_len)
    for trainer in trainers.values():  # warm-up (allocations, optimizer state)
        optimizer_step(trainer, data)
    times = {name: [] for name in TIMED}
    for r in range(rounds):
        order = TIMED[r % len(TIMED) :] + TIMED[: r % len(TIMED)]
        for name in order:
            start = time.perf_counter()
            optimizer_step(trainers[name], data)
            times[name].append(time.perf_counter() - start)
    result = {}
    for name in TIMED:
        ratios = [t / b for t, b in zip(times[name], times["lora"])]
        result[name] = {"step_s": quantiles(times[name]), "paired_ratio_vs_lora": quantiles(ratios)}
    on, off = times["glad"], times["glad (diagnostics off)"]
    result["diagnostics_on_vs_off"] = quantiles([a / b for a, b in zip(on, off)])
    # the diagnostics alone, on the real LoRA parameters (in place, as in the step)
    model = trainers["glad"].model
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    with torch.no_grad():
        saved, norm, scale = glad_perturb_(params, grads, 0.05, 0.5)
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            glad_diagnostics_(params, saved, grads, norm, scale, 0.5)
            samples.append(time.perf_counter() - start)
            torch._foreach_copy_(params, saved)
        glad_restore_(params, saved, grads, 0.5)
    diag = statistics.median(samples)
    result["diagnostics_alone_s"] = diag
    result["diagnostics_alone_fraction_of_glad_step"] = diag / statistics.median(on)
    del trainers
    return result


def memory_suite(batch: int, seq_len: int, tmp: str) -> dict:
    data = batches(1, batch, seq_len)
    out = {}
    for base, method in (("lora", "glad"), ("full", "full + glad")):
        peaks = {}
        for name in (base, method):
            trainer = make_trainer(name, os.path.join(tmp, "mem-" + name), batch)
            optimizer_step(trainer, data)  # warm-up: optimizer state
            peaks[name] = peak_tensor_bytes(lambda trainer=trainer: optimizer_step(trainer, data))
            size = trainable_bytes(trainer.model)
            del trainer
        extra = peaks[method] - peaks[base]
        out[method] = {
            "peak_bytes": peaks[method],
            "baseline_peak_bytes": peaks[base],
            "extra_bytes": extra,
            "trainable_bytes": size,
            "extra_in_trainable_copies": extra / size,
            "peak_ratio": peaks[method] / peaks[base],
        }
    return out


def trec_batches(tokenizer, n: int, seq_len: int):
    """The first `n` TREC training questions (coarse labels), tokenized: real text for the dropout-mask measurement."""
    rows = read_trec(data_path("trec", "train_5500.label"), TREC_LABELS)[:n]
    enc = tokenizer([text for text, _ in rows], truncation=True, max_length=seq_len, padding="max_length")
    return Dataset.from_dict({**enc, "labels": [label for _, label in rows]}), len(TREC_LABELS)


def masks_suite(steps: int, batch: int, tmp: str) -> dict:
    """cos(g, g_sam) and ||g_sam - g|| / ||g|| logged by GLAD on all-MiniLM-L6-v2 (LoRA r 8, dropout 0.1 in LoRA and
    in BERT) on TREC questions, with shared and with independent dropout masks: same model, data and seed."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data, num_labels = trec_batches(tokenizer, steps * batch, 64)
    out = {}
    for shared in (True, False):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "key", "value"])
        )
        args = TrainingArguments(
            output_dir=os.path.join(tmp, f"masks-{shared}"), per_device_train_batch_size=batch, max_steps=steps,
            learning_rate=3e-3, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        )  # fmt: skip
        reg = GLADRegularizer(rho=0.05, glad_lambda=0.5, share_dropout_masks=shared)
        trainer = regtune.RegTrainer(model=model, args=args, train_dataset=data, regularizers=[reg])
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "glad/cos_g_gsam" in entry]
        cos = [entry["glad/cos_g_gsam"] for entry in logs]
        rel = [entry["glad/rel_diff"] for entry in logs]
        out["shared" if shared else "independent"] = {
            "cos_g_gsam": quantiles(cos),
            "rel_diff": quantiles(rel),
            "per_step_cos": cos,
            "per_step_rel_diff": rel,
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="16x64,4x16", help="batch x tokens, comma separated")
    parser.add_argument("--masks-steps", type=int, default=10, help="steps of the dropout-mask measurement (0: skip)")
    parser.add_argument("--skip-timing", action="store_true", help="only the dropout-mask measurement")
    parser.add_argument("--out", default=os.path.join(OUT_DIR, "glad_cost"))
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    quiet_transformers()
    results = {"machine": machine_description("cpu"), "config": vars(cli), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if cli.masks_steps:
            results["dropout_masks"] = masks_suite(cli.masks_steps, 16, tmp)
        for size in [] if cli.skip_timing else cli.sizes.split(","):
            batch, seq_len = (int(x) for x in size.split("x"))
            results["sizes"][size] = {
                "time": time_suite(cli.rounds, batch, seq_len, tmp),
                "memory": memory_suite(batch, seq_len, tmp),
            }
    lines = []
    if "dropout_masks" in results:
        lines += ["| dropout masks | cos(g, g_sam) median (25-75%) | rel_diff median (25-75%) |", "|---|---|---|"]
        for name, m in results["dropout_masks"].items():
            c, r = m["cos_g_gsam"], m["rel_diff"]
            lines.append(
                f"| {name} | {c['median']:.3f} ({c['q25']:.3f}-{c['q75']:.3f}) | "
                f"{r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f}) |"
            )
        lines.append("")
    lines += ["| batch | variant | median step (s) | paired ratio vs LoRA (25-75%) |", "|---|---|---|---|"]
    for size, res in results["sizes"].items():
        for name in TIMED:
            row = res["time"][name]
            ratio = row["paired_ratio_vs_lora"]
            lines.append(
                f"| {size} | {name} | {row['step_s']['median']:.3f} | "
                f"{ratio['median']:.2f} ({ratio['q25']:.2f}-{ratio['q75']:.2f}) |"
            )
    lines += ["", "| batch | diagnostics on/off (25-75%) | diagnostics alone / GLAD step |", "|---|---|---|"]
    for size, res in results["sizes"].items():
        d = res["time"]["diagnostics_on_vs_off"]
        lines.append(
            f"| {size} | {d['median']:.3f} ({d['q25']:.3f}-{d['q75']:.3f}) | "
            f"{100 * res['time']['diagnostics_alone_fraction_of_glad_step']:.2f}% |"
        )
    lines += [
        "",
        "| batch | method | baseline peak (MB) | peak (MB) | extra (MB) | trainable (MB) | extra / trainable |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, res in results["sizes"].items():
        for name, m in res["memory"].items():
            lines.append(
                f"| {size} | {name} | {m['baseline_peak_bytes'] / 2**20:.1f} | {m['peak_bytes'] / 2**20:.1f} | "
                f"{m['extra_bytes'] / 2**20:.2f} | {m['trainable_bytes'] / 2**20:.2f} | "
                f"{m['extra_in_trainable_copies']:.2f} |"
            )
    os.makedirs(cli.out, exist_ok=True)
    write_results(os.path.join(cli.out, "glad_cost"), results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
