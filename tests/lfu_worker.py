"""Shared pieces of the LfU tests, and the worker of the 2-process DDP test.

Run as a script (`torchrun --standalone --nproc_per_node 2 tests/lfu_worker.py OUT --mode perturb`), or through
`run()` in-process, it trains a tiny Llama with LoRA and `LfUTrainer` on a prompt/completion data set and writes
into OUT: `world_size_{rank}.txt` and (rank 0) `weights.pt`.
"""

from __future__ import annotations

import argparse
import json
import os

import datasets
import torch
from distributed_worker import VOCAB, flat_weights, tiny_llama
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import regtune


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }} {{ eos_token }} {% endgeneration %}"
    "{% else %}{{ message['role'] }} {{ message['content'] }} assistant {% endif %}{% endfor %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "user": 3, "assistant": 4, **{f"w{i}": i for i in range(5, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w5"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _words(generator: torch.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in torch.randint(5, VOCAB, (n,), generator=generator).tolist())


def prompt_completion_dataset(n: int = 16, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    prompts = [_words(g, int(torch.randint(3, 6, (1,), generator=g))) + " " for _ in range(n)]
    completions = [_words(g, int(torch.randint(2, 5, (1,), generator=g))) for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})


def messages_dataset(n: int = 16, seed: int = 0) -> datasets.Dataset:
    pc = prompt_completion_dataset(n, seed)
    rows = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        for p, c in zip(pc["prompt"], pc["completion"])
    ]
    return datasets.Dataset.from_dict({"messages": rows})


def lora_model(init_random: bool = True, dropout: float = 0.0):
    """A tiny Llama with LoRA on all linear layers (random B, so the adapter acts from the start); `dropout` sets both
    the LoRA dropout and the attention dropout."""
    model = tiny_llama(attention_dropout=dropout)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=not init_random, lora_dropout=dropout
    )
    torch.manual_seed(1)
    return get_peft_model(model, config)


def lfu_config(out: str, **overrides) -> regtune.LfUConfig:
    kwargs = {
        "output_dir": out, "report_to": "none", "use_cpu": True, "per_device_train_batch_size": 4,
        "max_steps": 3, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "disable_tqdm": True, "train_sampling_strategy": "sequential", "max_length": 16,
        "seed": 0, "bf16": False, "max_grad_norm": 0.0, "dataset_num_proc": None,
    }  # fmt: skip
    kwargs.update(overrides)
    return regtune.LfUConfig(**kwargs)


def trainable_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])


def run(out: str, mode: str, per_device_batch: int, accumulation: int, max_steps: int = 3) -> None:
    model = lora_model()
    args = lfu_config(
        out,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        lfu_mode=mode,
        lfu_alpha=0.5,
        learning_rate=0.05 if mode == "perturb" else 0.01,
        lfu_beta=20.0,
        lfu_reps_lr_weight=0.2,
        # 2 processes x 1 micro-batch = 1 process x 2 accumulated ones needs the vectors' mean gradient: the released
        # rule ("last") steps on each process's last micro-batch, so it differs between the two set-ups by design
        lfu_reps_vector_grad="accumulate",
    )
    trainer = regtune.LfUTrainer(
        model=model, args=args, train_dataset=prompt_completion_dataset(), processing_class=word_tokenizer()
    )
    trainer.train()
    rank = trainer.args.process_index
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    os.makedirs(out, exist_ok=True)
    lfu = trainer.regularizers[0]
    report = {"world_size": world, "wrapped": type(trainer.model_wrapped).__name__}
    report["diagnostics"] = [
        {key: value for key, value in h.items() if key.startswith("lfu/")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    if lfu.directions is not None:
        report["directions"] = lfu.directions.detach().flatten().tolist()
    with open(os.path.join(out, f"world_size_{rank}.txt"), "w") as f:
        json.dump(report, f)
    if rank == 0:
        torch.save(trainable_weights(model), os.path.join(out, "weights.pt"))
        torch.save(flat_weights(model), os.path.join(out, "all_weights.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", default="perturb")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    from worker_exit import run_and_exit

    run_and_exit(run, cli.out, cli.mode, cli.per_device_batch, cli.accumulation)
