"""LfU RepS: how the steering vectors' gradient rule and dtype change training (docs/lfu.md, "Released code vs
regtune").

The released trainer sets the vectors' `.grad` per micro-batch (`param.grad = grad`), so under gradient accumulation
Adam steps on the last micro-batch's gradient only, and it makes the vectors with `torch.randn_like(hidden_state)`,
i.e. in bf16 when the model is loaded in bf16. This script trains the evidence model (the character-level Llama of
recipes/evidence/lfu.yaml, RepS alpha 0.64, beta 0.6) with batch 2 x 4 accumulated micro-batches under each rule and
dtype, through `regtune.LfUTrainer` as shipped, and reports:

- after the first optimizer step: the cosine between the vectors' update under the last-micro-batch rule and under
  the accumulated one, and the share of vector elements that changed;
- after `--steps` optimizer steps: the vectors' drift `||d - d_0|| / ||d_0||`, the mean logged ascent gain (how much
  the steering raises the loss of x'), and how far apart the LoRA weights of two settings end, relative to how far
  they moved: `||theta_a - theta_b|| / ||theta_b - theta_0||`.

    OMP_NUM_THREADS=1 python -m bench.lfu_reps_vectors       # 5-8 minutes on one CPU thread

Writes bench/results/evidence/lfu_reps_vectors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import regtune  # noqa: E402
from regtune.data import load_task  # noqa: E402


MODEL = "bench/models/char-llama-shakespeare"
OUT = "bench/results/evidence/lfu_reps_vectors.json"
SETTINGS = [  # (model dtype, lfu_reps_vector_dtype, lfu_reps_vector_grad)
    ("float32", "hidden", "last"),
    ("float32", "hidden", "accumulate"),
    ("bfloat16", "hidden", "last"),  # the released code's
    ("bfloat16", "hidden", "accumulate"),
    ("bfloat16", "float32", "last"),
    ("bfloat16", "float32", "accumulate"),
]


def train(model_dtype, vector_dtype, rule, lr, steps, data, tokenizer, seed):
    torch.manual_seed(seed)  # the same LoRA initialization for every setting
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=getattr(torch, model_dtype))
    with tempfile.TemporaryDirectory() as out:
        args = regtune.LfUConfig(
            out, max_steps=steps, learning_rate=lr, per_device_train_batch_size=2, gradient_accumulation_steps=4,
            lr_scheduler_type="constant", max_length=256, gradient_checkpointing=False, bf16=False, use_cpu=True,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
            lfu_mode="reps", lfu_alpha=0.64, lfu_beta=0.6, lfu_reps_vector_dtype=vector_dtype,
            lfu_reps_vector_grad=rule,
        )  # fmt: skip
        trainer = regtune.LfUTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        )
        trainer.train()
    lfu = trainer.regularizers[0]
    gains = [h["lfu/ascent_gain"] for h in trainer.state.log_history if "lfu/ascent_gain" in h]
    weights = torch.cat(
        [p.detach().float().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n]
    )  # fmt: skip
    return lfu.directions.detach().float().cpu(), weights, gains


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 4e-3])
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_task("shakespeare-turns", n_train=144, n_val=24)["train"]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    hidden = AutoModelForCausalLM.from_pretrained(MODEL).config.hidden_size
    blocks = AutoModelForCausalLM.from_pretrained(MODEL).config.num_hidden_layers
    init = torch.randn(blocks, hidden, generator=torch.Generator().manual_seed(cli.seed))
    start = time.time()
    report = {"model": MODEL, "seed": cli.seed, "steps": cli.steps, "batch": "2 x 4 accumulated", "results": []}
    lora0 = None
    for lr in cli.lrs:
        one, full = {}, {}
        for setting in SETTINGS:
            one[setting] = train(*setting, lr, 1, data, tokenizer, cli.seed)
            full[setting] = train(*setting, lr, cli.steps, data, tokenizer, cli.seed)
        if lora0 is None:
            lora0 = {
                m: train(m, "hidden", "last", 0.0, 1, data, tokenizer, cli.seed)[1] for m in ("float32", "bfloat16")
            }
        for setting in SETTINGS:
            model_dtype, vector_dtype, rule = setting
            d1, _, _ = one[setting]
            d, weights, gains = full[setting]
            start_d = init.to(getattr(torch, model_dtype) if vector_dtype == "hidden" else torch.float32).float()
            other = (model_dtype, vector_dtype, "accumulate" if rule == "last" else "last")
            o1 = one[other][0]
            row = {
                "lr": lr,
                "model_dtype": model_dtype,
                "vector_dtype": "bfloat16" if (vector_dtype == "hidden" and model_dtype == "bfloat16") else "float32",
                "vector_grad": rule,
                "first_step_changed_share": float(((d1 - start_d) != 0).float().mean()),
                "first_step_cosine_last_vs_accumulate": float(
                    torch.nn.functional.cosine_similarity((d1 - start_d).flatten(), (o1 - start_d).flatten(), dim=0)
                ),
                "drift": float((d - start_d).norm() / start_d.norm()),
                "changed_share": float(((d - start_d) != 0).float().mean()),
                "ascent_gain_mean": sum(gains) / len(gains) if gains else None,
                "lora_moved": float((weights - lora0[model_dtype]).norm()),
            }
            reference = full[("bfloat16", "float32", "accumulate")][1] if model_dtype == "bfloat16" else None
            if reference is None:
                reference = full[("float32", "hidden", "accumulate")][1]
            row["lora_gap_to_accumulate_fp32_vectors"] = float(
                (weights - reference).norm() / (reference - lora0[model_dtype]).norm()
            )
            report["results"].append(row)
            print(json.dumps(row))
    report["wall_s"] = round(time.time() - start, 1)
    report["date"] = time.strftime("%Y-%m-%d")
    report["torch"] = torch.__version__
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {OUT} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
