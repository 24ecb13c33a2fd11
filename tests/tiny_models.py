"""Tiny models built offline from configs, with fixed seeds: the model axis of the adapter test matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


VOCAB = 100


class MLP(nn.Module):
    """A plain torch model (no transformers): peft handles it through explicit `target_modules`."""

    def __init__(self, dim: int = 12, hidden: int = 24, classes: int = 3):
        super().__init__()
        self.lin0 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        logits = self.head(self.act(self.lin1(self.act(self.lin0(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def tiny_llama(vocab_size: int = VOCAB, max_position_embeddings: int = 64, **config) -> nn.Module:
    """A 2-layer, 16-wide Llama (seed 0) in eval mode; `config`: more `LlamaConfig` fields."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(vocab_size: int = VOCAB, max_position_embeddings: int = 64, num_labels: int = 3, **config) -> nn.Module:
    """A 2-layer, 16-wide BERT classifier (seed 0) in eval mode; `config`: more `BertConfig` fields."""
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        **config,
    )
    return BertForSequenceClassification(config).eval()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _token_batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if kind == "causal" else torch.randint(0, 3, (4,), generator=g)
    return batch


def _mlp_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(4, 12, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


@dataclass
class TinyModel:
    """One model of the matrix: how to build it, feed it, and what it is."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], dict]
    target_modules: list[str] | str
    is_decoder: bool = False
    task_type: str | None = None
    uses_conv1d: bool = False
    modules_to_save: list[str] | None = field(default=None)
    layers_key: str | None = None  # attribute holding the repeated blocks, for layers_to_transform


TINY_MODELS = {
    "llama": TinyModel(
        "llama",
        tiny_llama,
        lambda: _token_batch("causal"),
        target_modules="all-linear",
        is_decoder=True,
        task_type="CAUSAL_LM",
        layers_key="layers",
    ),
    "gpt2": TinyModel(
        "gpt2",
        tiny_gpt2,
        lambda: _token_batch("causal"),
        target_modules=["c_attn", "c_proj", "c_fc"],
        is_decoder=True,
        task_type="CAUSAL_LM",
        uses_conv1d=True,
        layers_key="h",
    ),
    "bert": TinyModel(
        "bert",
        tiny_bert,
        lambda: _token_batch("cls"),
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
        layers_key="layer",
    ),
    "mlp": TinyModel("mlp", tiny_mlp, _mlp_batch, target_modules=["lin0", "lin1"], modules_to_save=["head"]),
}


def model_inputs(batch: dict) -> dict:
    """The batch without labels (for output comparisons)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def logits_of(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**model_inputs(batch), **kwargs)
    return out["logits"]
