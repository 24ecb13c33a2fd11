"""Step time of regtune's trainers vs their baselines, measured side by side on all-MiniLM-L6-v2, plus adapter sizes.

Every variant trains through the same `transformers.Trainer` loop; the time of each optimizer step is taken by a
callback (`on_step_begin` -> `on_step_end`). Variants run in interleaved rounds (a few steps each, the order rotated
every round) so the noise of this shared machine hits them alike; the figure is the median step time over all
rounds after one warm-up round, and the ratio is taken against the baseline of the same run.

    python -m bench.trainer_step_time --suite mask_tuning   # full FT of the masked weights vs mask tuning (+ GD)
    python -m bench.trainer_step_time --suite glad          # peft LoRA vs GLAD (LoRA + SAM-referenced gradient)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads crawl on shared cores

import torch  # noqa: E402
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

import regtune  # noqa: E402
from bench._common import OUT_DIR, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from regtune.tuners.mask_tuning import save_real_valued_scores  # noqa: E402


ATTENTION = r".*encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def make_data(n: int, seq_len: int, vocab: int = 30000, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def base_model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def build(variant: str):
    """Return (model, trainer_cls, extra args) for a variant."""
    if variant == "full-ft(attention)":
        model = base_model()
        import re

        for name, param in model.named_parameters():
            param.requires_grad = bool(re.match(ATTENTION, name.rsplit(".", 1)[0])) or name.startswith("classifier")
        return model, regtune.RegTrainer, {}
    if variant.startswith("mask-tuning"):
        lam = 0.0 if variant == "mask-tuning" else float(variant.split("=")[1].rstrip(")"))
        config = regtune.MaskTuningConfig(target_modules=ATTENTION, task_type="SEQ_CLS", graddrop_lambda=lam)
        return get_peft_model(base_model(), config), regtune.MaskTuningTrainer, {}
    if variant == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=ATTENTION, task_type="SEQ_CLS")
        return get_peft_model(base_model(), config), regtune.RegTrainer, {}
    if variant.startswith("glad"):
        config = regtune.GLADConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=ATTENTION,
            task_type="SEQ_CLS",
            rho=0.05,
            glad_lambda=0.5,
        )
        return get_peft_model(base_model(), config), regtune.GLADTrainer, {}
    raise ValueError(variant)


SUITES = {
    "mask_tuning": ["full-ft(attention)", "mask-tuning", "mask-tuning+GD(lambda=1.0)"],
    "glad": ["lora", "glad"],
}


def run_steps(model, trainer_cls, steps: int, batch: int, seq_len: int, out: str, seed: int) -> list[float]:
    timer = StepTimer()
    args_cls = {
        regtune.MaskTuningTrainer: regtune.MaskTuningTrainingArguments,
        regtune.GLADTrainer: regtune.GLADTrainingArguments,
    }.get(trainer_cls, TrainingArguments)
    args = args_cls(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trainer_cls(
        model=model, args=args, train_dataset=make_data(batch * steps, seq_len, seed=seed), callbacks=[timer]
    )
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return timer.times


def adapter_sizes(tmp: str) -> dict:
    model = get_peft_model(base_model(), regtune.MaskTuningConfig(target_modules=ATTENTION, task_type="SEQ_CLS"))
    entries = sum(p.numel() for n, p in model.named_parameters() if "masktune_scores" in n)
    model.save_pretrained(os.path.join(tmp, "packed"))
    with save_real_valued_scores():
        model.save_pretrained(os.path.join(tmp, "scores"))

    def weights_size(d):
        return os.path.getsize(os.path.join(tmp, d, "adapter_model.safetensors"))

    # the classifier head (modules_to_save) is in both files: report it apart
    head = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "modules_to_save" in n)
    packed, scores = weights_size("packed"), weights_size("scores")
    return {
        "mask_entries": entries,
        "fp32_scores_bytes": entries * 4,
        "published_file_bytes": packed,
        "checkpoint_file_bytes": scores,
        "head_bytes_in_both": head,
        "masks_only_ratio": (packed - head) / (scores - head),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(OUT_DIR, "trainer_step_time"))
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    quiet_transformers()
    variants = SUITES[cli.suite]
    models = {v: build(v) for v in variants}
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cli.rounds + 1):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                model, trainer_cls, _ = models[v]
                t = run_steps(model, trainer_cls, cli.steps_per_round, cli.batch, cli.seq_len, tmp, seed=r)
                if r > 0:  # round 0 is the warm-up
                    times[v].extend(t)
        sizes = adapter_sizes(tmp) if cli.suite == "mask_tuning" else None
    baseline = statistics.median(times[variants[0]])
    rows = [
        {"variant": v, "median_step_s": statistics.median(times[v]), "steps": len(times[v]),
         "ratio_vs_" + variants[0]: statistics.median(times[v]) / baseline}
        for v in variants
    ]  # fmt: skip
    result = {
        "suite": cli.suite,
        "machine": machine_description("cpu"),
        "config": vars(cli),
        "rows": rows,
        "sizes": sizes,
    }
    os.makedirs(cli.out, exist_ok=True)
    with open(os.path.join(cli.out, f"{cli.suite}.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"| variant | median step (s) | ratio vs {variants[0]} |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_step_s']:.3f} | {r['ratio_vs_' + variants[0]]:.2f} |" for r in rows]
    if sizes:
        lines += ["", f"mask entries {sizes['mask_entries']:,}; fp32 scores {sizes['fp32_scores_bytes']:,} B; "
                  f"published adapter {sizes['published_file_bytes']:,} B vs checkpoint {sizes['checkpoint_file_bytes']:,} B "
                  f"(both hold the {sizes['head_bytes_in_both']:,} B classifier head); masks-only ratio "
                  f"{sizes['masks_only_ratio']:.4f} (goal <= 1/30 = 0.0333)"]  # fmt: skip
    table = "\n".join(lines)
    with open(os.path.join(cli.out, f"{cli.suite}.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
