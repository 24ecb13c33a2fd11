"""Worker for test_glad.py's DDP test: trains the tiny MLP with GLAD and writes the weights and world size."""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from tiny_models import MLP  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from regtune.regularizers.glad import GLADRegularizer  # noqa: E402
from regtune.trainers import RegTrainer  # noqa: E402


def main(out: str, per_device_batch: int, accumulation: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    data = Dataset.from_dict(
        {"x": torch.randn(32, 12, generator=g).tolist(), "labels": torch.randint(0, 3, (32,), generator=g).tolist()}
    )
    torch.manual_seed(0)
    model = MLP()
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
    )
    trainer = RegTrainer(model=model, args=args, train_dataset=data, regularizers=[GLADRegularizer(0.3, 0.5)])
    trainer.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(out, f"world_size_{args.process_index}.json"), "w") as f:
        json.dump({"world_size": world}, f)
    if args.process_index == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out, "weights.pt"))


if __name__ == "__main__":
    from worker_exit import run_and_exit

    run_and_exit(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
