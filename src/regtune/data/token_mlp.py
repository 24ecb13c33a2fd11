"""A small MLP over a fixed number of tokens, trained from scratch: the model of regtune's algorithmic and pixel tasks.

`import regtune.data` (which the recipe engine imports) registers its config as `model_type: regtune-token-mlp` with
`AutoConfig` and the classifier with `AutoModelForSequenceClassification`, so a recipe builds it with
`model: {config: {model_type: regtune-token-mlp, ...}, tokenizer: ...}`, and after `import regtune.data` a saved one
loads with `AutoModelForSequenceClassification.from_pretrained(dir)` like any model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TokenMLPConfig(PretrainedConfig):
    """
    Config of [`TokenMLPForSequenceClassification`].

    Args:
        vocab_size (`int`, defaults to `30522`): the tokenizer's vocabulary size.
        num_tokens (`int`, defaults to `4`): the number of token positions read (inputs are cut or padded to it).
        embed_dim (`int`, defaults to `16`): the embedding size of each token.
        hidden_sizes (`list[int]`, defaults to `[256, 256]`): the widths of the hidden layers (ReLU).
        dropout (`float`, defaults to `0.0`): dropout after each hidden layer.
    """

    model_type = "regtune-token-mlp"

    def __init__(
        self,
        vocab_size: int = 30522,
        num_tokens: int = 4,
        embed_dim: int = 16,
        hidden_sizes: list[int] | None = None,
        dropout: float = 0.0,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.num_tokens = num_tokens
        self.embed_dim = embed_dim
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [256, 256]
        self.dropout = dropout
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class TokenMLPForSequenceClassification(PreTrainedModel):
    """
    `logits = MLP(concat(embed(input_ids[:, :num_tokens])))`: each position has its own slice of the first layer,
    so the model reads a fixed-length token sequence as a vector (e.g. the two operands of `(a + b) mod p`, or the 64
    pixel intensities of an 8x8 digit). The loss is the model's own `loss_function` (cross-entropy for integer
    labels), as for any `*ForSequenceClassification` model.
    """

    config_class = TokenMLPConfig
    base_model_prefix = "mlp"

    def __init__(self, config: TokenMLPConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        layers: list[nn.Module] = []
        width = config.num_tokens * config.embed_dim
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        n = self.config.num_tokens
        if input_ids.shape[1] < n:
            pad = input_ids.new_full((input_ids.shape[0], n - input_ids.shape[1]), self.config.pad_token_id or 0)
            input_ids = torch.cat([input_ids, pad], dim=1)
        hidden = self.embed(input_ids[:, :n]).flatten(1)
        logits = self.classifier(self.mlp(hidden))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, num_items_in_batch=num_items_in_batch)
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(TokenMLPConfig.model_type, TokenMLPConfig, exist_ok=True)
AutoModelForSequenceClassification.register(TokenMLPConfig, TokenMLPForSequenceClassification, exist_ok=True)
