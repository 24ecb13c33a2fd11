"""LfU vs SFT: in-task loss, forgetting and robustness to prompt templates, plus step time, on a real (tiny) causal LM.

No pretrained causal LM is available offline, so by default the bench first pretrains a small Llama (3.4M parameters,
character-level, built from a config) on Tiny Shakespeare (`../shared/data/text/input.txt`, the first 90% minus the
turns of one speaker), caches it under `bench/out/lfu/`, then fine-tunes it with LoRA on that speaker's turns as
prompt/completion pairs (prompt = the end of the previous turn + the speaker's name, completion = the turn).

Measured for each method and seed:

1. **in-task loss**: completion-token loss on held-out turns of the speaker, with the training template;
2. **forgetting**: language-modeling loss on the held-out 10% of the corpus (other plays), after minus before;
3. **robustness**: standard deviation of the in-task loss across 7 prompt templates (the training one and 6
   paraphrases: other casing, spacing, "X speaks:", "[X]", ...).

Then the step time of each method vs SFTTrainer, measured side by side in interleaved rounds (median step time, ratio
to the SFT median of the same run).

    python -m bench.lfu                                  # pretrain (cached) + 3 seeds x 4 methods + step time
    python -m bench.lfu --model meta-llama/Llama-3.2-1B  # any causal LM from the Hub or a local directory
    python -m bench.lfu --seeds 0 --timing-rounds 0      # quick
    python -m bench.lfu --diagnostics-overhead 1 --timing-steps 30   # cost of LfU's diagnostics (counted + timed)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads crawl on shared cores

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
import regtune  # noqa: E402
from bench._common import OUT_DIR, machine_description, quiet_transformers  # noqa: E402
from regtune.data.char_tokenizer import build_char_tokenizer  # noqa: E402
from regtune.data.shakespeare import read_corpus, speaker_pairs  # noqa: E402


SPEAKER = "GLOUCESTER"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step of a Trainer run (`times`, seconds)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


TEMPLATES = [
    "{ctx}\n\n{name}:\n",  # the training template (the corpus' own format)
    "{ctx}\n\n{title}:\n",
    "{ctx}\n{name}:\n",
    "{ctx}\n\n{name} speaks:\n",
    "{ctx}\n\n[{name}]\n",
    "{ctx}\n\n{name}: ",
    "{name} answers:\n{ctx}\n\n",
]
METHODS = {  # config overrides; "sft*" methods train with trl's SFTTrainer, the others with LfUTrainer
    "sft": {},
    # a weaker SFT (lower learning rate): the baseline that trades in-task loss for forgetting without LfU
    "sft-lr3e-4": {"learning_rate": 3e-4},
    "sft-lr5e-4": {"learning_rate": 5e-4},
    "lfu-perturb": {"lfu_mode": "perturb"},
    "lfu-perturb-same": {"lfu_mode": "perturb", "lfu_second_batch": "same"},
    "lfu-reps": {"lfu_mode": "reps"},
    # stronger than the paper's defaults, whose consistency term is ~0.3% (perturb) / ~0.5% (reps) of the SFT loss at
    # this scale: alpha 1 makes it ~15% (perturb), beta 2 ~10% (reps)
    "lfu-perturb-a1": {"lfu_mode": "perturb", "lfu_alpha": 1.0},
    "lfu-reps-b2": {"lfu_mode": "reps", "lfu_beta": 2.0},
}
DEFAULT_METHODS = ["sft", "lfu-perturb", "lfu-perturb-same", "lfu-reps"]
PRETRAIN_CONFIG = {
    "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "intermediate_size": 768, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


# ---- data ----


def render(template: str, ctx: str) -> str:
    return template.format(ctx=ctx, name=SPEAKER, title=SPEAKER.title())


# ---- pretraining ----


def pretrain(text: str, out: str, steps: int, seed: int = 0, shape: dict | None = None, lr: float = 2e-3) -> dict:
    """Pretrain a character-level Llama of `shape` (default `PRETRAIN_CONFIG`) on `text`, save it to `out`."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer(text)
    shape = PRETRAIN_CONFIG if shape is None else shape
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3, **shape)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        offsets = torch.randint(0, len(ids) - 129, (16,), generator=g)
        batch = torch.stack([ids[o : o + 128] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"steps": steps, "last_loss": loss.item(), "seconds": time.perf_counter() - start}


# ---- evaluation ----


@torch.no_grad()
def completion_loss(model, tokenizer, pairs: list, template: str, batch_size: int = 16) -> float:
    """Mean loss per completion token (completion + EOS), prompts rendered with `template`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        rows = []
        for ctx, turn in pairs[i : i + batch_size]:
            prompt = tokenizer(render(template, ctx), add_special_tokens=False)["input_ids"]
            completion = tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt + completion, [-100] * len(prompt) + completion))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((target != -100).sum())
    return total / count


@torch.no_grad()
def corpus_loss(model, tokenizer, text: str, chunks: int = 48, length: int = 128) -> float:
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = (len(ids) - length) // chunks
    batch = torch.tensor([ids[i * step : i * step + length] for i in range(chunks)])
    losses = [model(input_ids=batch[i : i + 16], labels=batch[i : i + 16]).loss.item() for i in range(0, chunks, 16)]
    return statistics.mean(losses)


def evaluate(model, tokenizer, test_pairs, held_out_text) -> dict:
    per_template = [completion_loss(model, tokenizer, test_pairs, t) for t in TEMPLATES]
    return {
        "in_task": per_template[0],
        "per_template": per_template,
        "template_std": statistics.pstdev(per_template),
        "corpus": corpus_loss(model, tokenizer, held_out_text),
    }


# ---- fine-tuning ----


def sft_dataset(pairs: list) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [render(TEMPLATES[0], ctx) for ctx, _ in pairs], "completion": [turn for _, turn in pairs]}
    )


def make_trainer(method: str, model_dir: str, dataset: Dataset, tokenizer, out: str, seed: int, **overrides):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = {
        "output_dir": out, "report_to": "none", "use_cpu": True, "per_device_train_batch_size": 8,
        "num_train_epochs": 3, "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
        "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True, "max_length": 320, "seed": seed,
        "bf16": False, "dataset_num_proc": None,
    }  # fmt: skip
    common.update(METHODS[method])
    common.update(overrides)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    if method.startswith("sft"):
        return SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
            peft_config=peft_config,
        )  # fmt: skip
    return regtune.LfUTrainer(
        model=model, args=regtune.LfUConfig(**common), train_dataset=dataset,
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip


def time_steps(methods, model_dir, dataset, tokenizer, rounds: int, steps: int) -> dict:
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make_trainer(method, model_dir, dataset, tokenizer, tmp, seed=r, max_steps=steps + 1)
                timer = StepTimer()
                trainer.add_callback(timer)
                trainer.train()
                times[method].extend(timer.times[1:])  # the first step warms up
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {
        "median_step_s": medians,
        "ratio_vs_sft": {m: medians[m] / medians["sft"] for m in methods},
        "steps": {m: len(t) for m, t in times.items()},
    }


def diagnostics_overhead(model_dir, dataset, tokenizer, rounds: int, steps: int, **overrides) -> dict:
    """
    The cost of LfU's diagnostics, logging every step (the worst case: the ascent-gain measurement is then limited by
    its compute budget only), with the diagnostics on vs off, in interleaved rounds (one warm-up step per trainer):

    - counted: the backbone forwards with and without gradient (a hook on the backbone; gradient checkpointing's
      recomputations are not forwards of the backbone), and the extra no-grad forwards of the diagnostics as a
      fraction of the training passes, in forward-equivalents (a forward with its backward = 3);
    - timed: the mean step time (the measurement runs on some steps only, so the mean, not the median).
    """
    from regtune.regularizers.lfu import find_decoder_blocks

    methods = ["lfu-perturb", "lfu-perturb-same", "lfu-reps"]
    variants = [(m, diag) for m in methods for diag in (True, False)]
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    counts = {v: {"grad": 0, "no_grad": 0} for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for method, diag in order:
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make_trainer(
                    method, model_dir, dataset, tokenizer, tmp, seed=r, max_steps=steps + 1, logging_steps=1,
                    lfu_log_diagnostics=diag, **overrides,
                )  # fmt: skip
                backbone, _ = find_decoder_blocks(trainer.model)
                count = counts[(method, diag)]

                def tally(module, args, count=count):
                    count["grad" if torch.is_grad_enabled() else "no_grad"] += 1

                backbone.register_forward_pre_hook(tally)
                timer = StepTimer()
                trainer.add_callback(timer)
                trainer.train()
                times[(method, diag)].extend(timer.times[1:])
    out = {}
    for method in methods:
        on, off = counts[(method, True)], counts[(method, False)]
        extra = on["no_grad"] - off["no_grad"]
        t_on, t_off = statistics.mean(times[(method, True)]), statistics.mean(times[(method, False)])
        out[method] = {
            "forwards_on": on, "forwards_off": off, "extra_forward_fraction": extra / (3 * on["grad"]),
            "mean_step_s_on": t_on, "mean_step_s_off": t_off, "time_overhead": t_on / t_off - 1.0,
            "steps": len(times[(method, True)]),
        }  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a causal LM (Hub id or directory); default: pretrain one")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--timing-rounds", type=int, default=2)
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--diagnostics-overhead", type=int, default=0, metavar="ROUNDS",
        help="only measure the step time of LfU with its diagnostics on vs off (ROUNDS interleaved rounds of "
        "--timing-steps steps each, logging every step) on a randomly initialized model of the bench's shape",
    )  # fmt: skip
    parser.add_argument("--out", default=os.path.join(OUT_DIR, "lfu"))
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    quiet_transformers()
    os.makedirs(cli.out, exist_ok=True)

    train_text, held_out_text = read_corpus()
    pairs, pretrain_text = speaker_pairs(train_text)
    random.Random(0).shuffle(pairs)
    train_pairs, test_pairs = pairs[:160], pairs[160:]
    model_dir = cli.model
    if cli.diagnostics_overhead:
        if model_dir is None:  # the step time does not depend on the weights: no pretraining needed
            model_dir = os.path.join(cli.out, "random-llama")
            tokenizer = build_char_tokenizer(pretrain_text)
            config = LlamaConfig(
                vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3, **PRETRAIN_CONFIG
            )
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        small = {"per_device_train_batch_size": 2, "max_length": 128}  # cheaper steps; the ratios are what matters
        result = diagnostics_overhead(
            model_dir, sft_dataset(train_pairs), tokenizer, cli.diagnostics_overhead, cli.timing_steps, **small
        )
        result = {"diagnostics_overhead": result, "machine": machine_description("cpu"), "logging_steps": 1, **small}
        results_dir = os.path.join(HERE, "results")
        with open(os.path.join(results_dir, "lfu_diagnostics.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
        return
    if model_dir is None:
        model_dir = os.path.join(cli.out, f"pretrained-llama-{cli.pretrain_steps}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            pretrain(pretrain_text, model_dir, cli.pretrain_steps)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = sft_dataset(train_pairs)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = evaluate(base, tokenizer, test_pairs, held_out_text)
    print(f"pretrained: {json.dumps(before)}", flush=True)
    results = {"before": before, "runs": []}
    results_path = os.path.join(cli.out, "results.json")
    for seed in cli.seeds:
        for method in cli.methods:
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make_trainer(method, model_dir, dataset, tokenizer, tmp, seed)
                start = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - start
                metrics = evaluate(trainer.model, tokenizer, test_pairs, held_out_text)
            metrics.update(method=method, seed=seed, train_s=seconds, forgetting=metrics["corpus"] - before["corpus"])
            results["runs"].append(metrics)
            print(json.dumps(metrics), flush=True)
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)

    if cli.timing_rounds:
        timing_methods = ["sft", *[m for m in cli.methods if m != "sft"]]
        results["timing"] = time_steps(
            timing_methods, model_dir, dataset, tokenizer, cli.timing_rounds, cli.timing_steps
        )
        print(json.dumps(results["timing"]), flush=True)
    results["machine"] = machine_description("cpu")
    results["model"] = cli.model or f"pretrained {PRETRAIN_CONFIG} for {cli.pretrain_steps} steps"
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    write_table(results, os.path.join(cli.out, "results.md"))


def write_table(results: dict, path: str) -> None:
    lines = [
        f"pretrained model: in-task {results['before']['in_task']:.3f}, corpus {results['before']['corpus']:.3f}, "
        f"template std {results['before']['template_std']:.3f}",
        "",
        "| method | seeds | in-task loss | forgetting (corpus loss after - before) | template std | train s |",
        "|---|---|---|---|---|---|",
    ]
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    for method in methods:
        runs = [r for r in results["runs"] if r["method"] == method]

        def cell(key, runs=runs):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        lines.append(
            f"| {method} | {len(runs)} | {cell('in_task')} | {cell('forgetting')} | {cell('template_std')} | "
            f"{statistics.mean(r['train_s'] for r in runs):.0f} |"
        )
    if "timing" in results:
        lines += ["", "| method | median step (s) | ratio vs SFTTrainer |", "|---|---|---|"]
        for method, ratio in results["timing"]["ratio_vs_sft"].items():
            lines.append(f"| {method} | {results['timing']['median_step_s'][method]:.3f} | {ratio:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
