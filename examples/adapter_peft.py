"""
An ALLoRA adapter through peft's own API: `peft.get_peft_model` on a sentence classifier, a short training run with
`regtune.RegTrainer`, then the adapter saved, loaded back with `PeftModel.from_pretrained` (after `import regtune`,
which registers the ALLORA type with peft) and exported with `regtune.export_as_lora` as a standard peft LoRA that
vLLM, TGI or plain peft load without regtune. GLAD works the same way (`regtune.GLADConfig`, `regtune.GLADTrainer`).

    python examples/adapter_peft.py                              # all-MiniLM-L6-v2 on SetFit/sst2 (downloads both)
    python examples/adapter_peft.py --model google-bert/bert-base-uncased --max_steps 1000 --output_dir out/bert
"""

import argparse

import numpy as np
import torch
from datasets import load_dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

import regtune


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="a Hub id or a local folder")
parser.add_argument("--dataset", default="SetFit/sst2", help="train/validation splits with `text` and `label`")
parser.add_argument("--max_steps", type=int, default=300)
parser.add_argument("--output_dir", default="out/adapter_peft")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
data = load_dataset(args.dataset).map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)


def base_model():
    return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)


config = regtune.ALLoRAConfig(r=8, eta=2.0, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
model = get_peft_model(base_model(), config)
model.print_trainable_parameters()
training = TrainingArguments(args.output_dir, max_steps=args.max_steps, learning_rate=1e-3, report_to="none")
trainer = regtune.RegTrainer(
    model=model,
    args=training,
    train_dataset=data["train"],
    eval_dataset=data["validation"],
    processing_class=tokenizer,
    compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
)
trainer.train()
print(f"validation accuracy: {trainer.evaluate()['eval_accuracy']:.3f}")

model.save_pretrained(f"{args.output_dir}/adapter")  # adapter_config.json says "peft_type": "ALLORA"
reloaded = PeftModel.from_pretrained(base_model(), f"{args.output_dir}/adapter").eval()
regtune.export_as_lora(reloaded, f"{args.output_dir}/lora")  # "peft_type": "LORA", lora_alpha = r
exported = PeftModel.from_pretrained(base_model(), f"{args.output_dir}/lora").eval()

batch = tokenizer(data["validation"]["text"][:8], padding=True, return_tensors="pt")
with torch.no_grad():
    diff = (reloaded(**batch).logits - exported(**batch).logits).abs().max().item()
print(f"exported LoRA vs ALLoRA adapter: max logit difference {diff:.2e}")
