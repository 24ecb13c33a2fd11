"""A sentence encoder used as a classifier over class descriptions (a dual encoder, as CLIP is for images).

A text is embedded as the mean of the encoder's last hidden states over its non-padding tokens, L2-normalized. Each
class is the embedding of a short description of it ("a question asking for a location"). The logits are
`scale * cosine(text, class)`; the loss is their cross-entropy. No new head is trained, so the pretrained encoder
classifies zero-shot, and a class never seen in training can still be predicted (base-to-novel generalization).

Where the class embeddings (prototypes) come from is a choice (`prototypes`):

- `"encoder"`: through the same, adapted encoder at every forward pass, with gradient (the descriptions are a
  second, tiny batch): fine-tuning moves the texts and the class prototypes together.
- `"frozen"`: computed once by the pretrained encoder (in eval mode, without gradient) when the classifier is
  built, and kept fixed, as CLIP's text features are in CoOp-style prompt or mask tuning of the image tower.

A recipe builds it with `model: {name_or_path: builtin:all-MiniLM-L6-v2, head: class-descriptions}`; see
docs/recipes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput


DEFAULT_SCALE = 20.0  # the similarity scale all-MiniLM-L6-v2 was trained with (sentence-transformers' loss)
PROTOTYPES = ("encoder", "frozen")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (batch, tokens, dim) over the non-padding tokens, L2-normalized."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def cosine_logits(text_emb: torch.Tensor, class_emb: torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """`scale * text_emb @ class_emb.T` (both L2-normalized: scaled cosine similarities)."""
    return scale * text_emb @ class_emb.T


class DualEncoderClassifier(torch.nn.Module):
    """
    An encoder as a classifier over a fixed set of class descriptions.

    `forward(input_ids, attention_mask, labels=None, class_mask=None)` returns a `SequenceClassifierOutput` whose
    logits are `scale` * cosine(text, class description) and whose loss is their cross-entropy: what every
    `transformers` trainer and regtune regularizer expects, so peft adapters (LoRA, mask tuning, ...) wrap it like
    any model. `class_mask` (batch, classes; 1 = a candidate) restricts each example to some classes (base-to-novel:
    base-class examples are classified among the base classes): the other logits are set to a large negative value,
    so they get no probability and no gradient.

    Args:
        encoder (`torch.nn.Module`): a transformers encoder (e.g. a `BertModel`); its `last_hidden_state` is
            mean-pooled.
        descriptions (`dict`): the tokenized class descriptions (`input_ids`, `attention_mask`), one row per class.
        scale (`float`, defaults to 20.0): the fixed logit scale.
        prototypes (`str`, defaults to `"encoder"`): `"encoder"` (class embeddings through the adapted encoder at
            every forward, with gradient) or `"frozen"` (computed once, here, by the encoder in eval mode without
            gradient).
    """

    def __init__(
        self, encoder: torch.nn.Module, descriptions: dict, scale: float = DEFAULT_SCALE, prototypes="encoder"
    ):
        super().__init__()
        if prototypes not in PROTOTYPES:
            raise ValueError(f"`prototypes` must be one of {', '.join(PROTOTYPES)}, got {prototypes!r}")
        if not scale > 0:
            raise ValueError(f"`scale` must be a number > 0, got {scale!r}")
        self.encoder = encoder
        self.config = encoder.config  # trainers and peft read it
        self.scale = float(scale)
        self.prototypes = prototypes
        self.register_buffer("class_input_ids", descriptions["input_ids"], persistent=False)
        self.register_buffer("class_attention_mask", descriptions["attention_mask"], persistent=False)
        frozen = None
        if prototypes == "frozen":
            was_training = encoder.training
            encoder.eval()
            with torch.no_grad():
                frozen = self.embed(self.class_input_ids, self.class_attention_mask)
            encoder.train(was_training)
        self.register_buffer("frozen_class_embeddings", frozen, persistent=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalized mean-pooled embeddings of a tokenized batch."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def class_embeddings(self) -> torch.Tensor:
        """The class prototypes (frozen, or through the encoder now)."""
        if self.frozen_class_embeddings is not None:
            return self.frozen_class_embeddings
        return self.embed(self.class_input_ids, self.class_attention_mask)

    def forward(
        self, input_ids, attention_mask=None, labels=None, class_mask=None, token_type_ids=None
    ) -> SequenceClassifierOutput:
        # `token_type_ids` is accepted (tokenizers return it) and not used: single sentences have type 0 throughout
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.embed(input_ids, attention_mask)
        classes = self.class_embeddings().to(text.dtype)
        logits = cosine_logits(text, classes, self.scale)
        if class_mask is not None:
            logits = logits.masked_fill(class_mask == 0, -1e4)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
