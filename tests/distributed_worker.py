"""Worker for tests/test_distributed.py, and the tiny models / test regularizers the regularizer tests share.

Run as a script (`torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT --per-device-batch 2`), or
through `run()` in-process, it trains a tiny Llama with `RegTrainer` and regularizers, and writes into OUT:
`world_size_{rank}.txt` (the process group's real size, so the test can tell that two processes ran), `weights.pt`
(rank 0) and a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import datasets
import tiny_models
import torch
from torch import nn
from transformers import TrainingArguments

from regtune.regularizers import DropoutSchedule, MultiSampleDropout, Regularizer
from regtune.trainers import RegTrainer


VOCAB = 64

# ---- tiny models and data (shared with the tests) ----


def tiny_bert(dropout: float = 0.1, classifier_dropout: float | None = None, num_labels: int = 2) -> nn.Module:
    """[`tiny_models.tiny_bert`] with this file's vocabulary and dropout knobs, in train mode."""
    return tiny_models.tiny_bert(
        vocab_size=VOCAB,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        classifier_dropout=classifier_dropout,
    ).train()


def tiny_llama(attention_dropout: float = 0.0) -> nn.Module:
    """[`tiny_models.tiny_llama`] with this file's vocabulary, in train mode."""
    return tiny_models.tiny_llama(
        vocab_size=VOCAB, max_position_embeddings=32, attention_dropout=attention_dropout
    ).train()


class PlainClassifier(nn.Module):
    """A plain torch model whose `forward` takes no `**kwargs`: the Trainer divides its loss by the GA steps."""

    def __init__(self, classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, classes)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.hidden(self.embed(input_ids).mean(dim=1)))
        logits = self.classifier(h)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def classification_dataset(n: int = 16, seq_len: int = 8, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def causal_dataset(n: int = 16, seq_len: int = 8, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def training_args(output_dir: str, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": output_dir,
        "report_to": "none",
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "seed": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


# ---- test regularizers ----


class LogitPenalty(Regularizer):
    """`weight * mean(logits^2)`: a per-micro-batch mean that depends on the batch."""

    name = "logit_penalty"

    def __init__(self, weight: float = 1.0):
        self.weight = weight
        self.calls = 0
        self.batch_sizes: list[int] = []

    def loss_term(self, model, inputs, outputs):
        self.calls += 1
        logits = outputs["logits"]
        self.batch_sizes.append(int(logits.shape[0]))
        return self.weight * logits.float().pow(2).mean()


class ParamL2(Regularizer):
    """`weight * ||theta||^2` over the trainable parameters: independent of the batch and of the outputs."""

    name = "param_l2"

    def __init__(self, weight: float = 0.05):
        self.weight = weight
        self.calls = 0

    def loss_term(self, model, inputs, outputs):
        self.calls += 1
        params = [p for p in model.parameters() if p.requires_grad]
        return self.weight * torch.stack([p.float().pow(2).sum() for p in params]).sum()


class NoisyPenalty(Regularizer):
    """A stateful loss term: a coefficient drawn from its own generator at every call (state: the generator)."""

    name = "noisy_penalty"

    def __init__(self, weight: float = 1.0, seed: int = 123):
        self.weight = weight
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def loss_term(self, model, inputs, outputs):
        self.calls += 1
        coefficient = torch.rand((), generator=self.generator).item() * 4.0
        return self.weight * coefficient * outputs["logits"].float().pow(2).mean()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.calls = state["calls"]


class PlainStepOwner(Regularizer):
    """Owns the step and does exactly what `Trainer.training_step` does, through the mixin's helpers."""

    name = "plain_step_owner"
    owns_step = True

    def __init__(self):
        self.calls = 0

    def training_step(self, trainer, model, inputs, num_items_in_batch=None):
        self.calls += 1
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return trainer.scaled_backward(loss, num_items_in_batch)


# ---- the DDP worker ----


def run(out: str, per_device_batch: int, grad_accum: int = 2, steps: int = 3) -> None:
    """Train, and write the report (`world_size_{rank}.txt`), the weights (rank 0) and a checkpoint into `out`."""
    model = tiny_llama()
    args = training_args(
        out,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        learning_rate=0.2,
        save_strategy="steps",
        save_steps=steps,
        logging_steps=steps,
    )
    regularizers = [LogitPenalty(weight=0.5), ParamL2(weight=0.01), DropoutSchedule(p=0.0), PlainStepOwner()]
    trainer = RegTrainer(model=model, args=args, train_dataset=causal_dataset(n=32), regularizers=regularizers)
    trainer.train()

    rank = args.process_index
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    calls = {reg.name: getattr(reg, "calls", None) for reg in regularizers}

    # multi-sample dropout under DDP: the head hooks sit on the module inside DistributedDataParallel
    msd_args = training_args(os.path.join(out, "msd"), per_device_train_batch_size=2, max_steps=2, learning_rate=0.05)
    msd_trainer = RegTrainer(
        model=tiny_llama(),
        args=msd_args,
        train_dataset=causal_dataset(n=16),
        regularizers=[MultiSampleDropout(num_samples=4, p=0.2), DropoutSchedule(p=0.1)],
    )
    msd_loss = msd_trainer.train().training_loss

    report = {
        "world_size": world,
        "args_world_size": args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "calls": calls,
        "msd_loss_finite": math.isfinite(msd_loss),
    }
    with open(os.path.join(out, f"world_size_{rank}.txt"), "w") as f:
        json.dump(report, f)
    if rank == 0:
        torch.save(flat_weights(trainer.model), os.path.join(out, "weights.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    run(cli.out, cli.per_device_batch, cli.grad_accum, cli.steps)


if __name__ == "__main__":
    from worker_exit import run_and_exit

    run_and_exit(main)
