"""
LfU ("Learning from the Undesirable") on supervised fine-tuning: `regtune.LfUTrainer` is trl's `SFTTrainer` plus a
consistency loss that keeps the hidden states stable under an undesirable (loss-raising) update. It takes what
SFTTrainer takes: a model id or path, an `LfUConfig` (= `SFTConfig` + `lfu_*` fields), any SFT data set (here
prompt/completion rows) and a peft `LoraConfig`. See docs/lfu.md.

    python examples/lfu_sft.py                                   # Qwen/Qwen3-0.6B on trl-lib/tldr (downloads both)
    python examples/lfu_sft.py --model meta-llama/Llama-3.1-8B --max_steps 2000   # the paper's model (a GPU)
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig

import regtune


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Qwen/Qwen3-0.6B", help="a Hub id or a local folder")
parser.add_argument("--dataset", default="trl-lib/tldr", help="a data set with `prompt` and `completion` columns")
parser.add_argument("--max_samples", type=int, default=2000)
parser.add_argument("--max_steps", type=int, default=200)
parser.add_argument("--output_dir", default="out/lfu_sft")
args = parser.parse_args()

train = load_dataset(args.dataset, split="train")
train = train.select(range(min(args.max_samples, len(train))))
config = regtune.LfUConfig(
    args.output_dir,
    lfu_mode="perturb",  # or "reps" (representation steering)
    lfu_alpha=0.1,
    lfu_beta=5.0,
    learning_rate=1e-4,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    max_length=512,
    logging_steps=max(args.max_steps // 10, 1),
    report_to="none",
)
trainer = regtune.LfUTrainer(
    model=args.model,
    args=config,
    train_dataset=train,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model(f"{args.output_dir}/adapter")  # a plain peft LoRA adapter
for log in trainer.state.log_history:  # lfu/cons_to_sft: beta * L_cons / L_sft; lfu/ascent_gain: see docs/lfu.md
    if "lfu/cons_to_sft" in log:
        lfu = ", ".join(f"{key} {value:.4f}" for key, value in log.items() if key.startswith("lfu/"))
        print(f"step {log['step']}: loss {log['loss']:.3f}, {lfu}")
