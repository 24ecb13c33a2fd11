"""R-AMT's two training regularizers for mask tuning: the score penalty and gradient dropout."""

from __future__ import annotations

import torch
import torch.distributed as dist

from regtune.functional.masks import gradient_dropout, score_penalty, soft_cross_entropy

from .base import Regularizer


SCORE_PARAM = "masktune_scores"


def _trainable_scores(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if SCORE_PARAM in n and p.requires_grad]


class MaskScorePenalty(Regularizer):
    """
    `weight * sum_l ||S_l||_2` (unsquared) over the trainable mask scores, added to the task loss
    ([R-AMT](https://huggingface.co/papers/2307.15049), weight 1e-4).

    Args:
        weight (`float`, defaults to `1e-4`): must be >= 0.
    """

    name = "mask_score_penalty"

    def __init__(self, weight: float = 1e-4):
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise ValueError(f"MaskScorePenalty: `weight` must be a number >= 0, got {weight!r}.")
        self.weight = float(weight)

    def loss_term(self, model, inputs, outputs):
        scores = _trainable_scores(model)
        if not scores or self.weight == 0.0:
            return None
        return self.weight * score_penalty(scores)


class GradientDropout(Regularizer):
    """
    R-AMT's gradient dropout ([paper](https://huggingface.co/papers/2307.15049)): the task gradient `g_a` of each
    mask score survives elementwise with a probability that measures its agreement with the knowledge gradient
    `g_b` -- the gradient of the soft cross-entropy (T = 1) between the model and the same model with its masks
    disabled (the pre-trained model; no second copy is kept). See [`regtune.functional.masks.gradient_dropout`].

    Per micro-batch: one forward with the adapters disabled (no grad), one forward of the model, `g_b` by
    `torch.autograd.grad` over the scores, then the usual backward of the task loss (which includes any loss term,
    e.g. [`MaskScorePenalty`]). Other trainable parameters (a classifier head) get `g_a` unchanged.

    Semantics (tested):

    - **Gradient accumulation**: `g_a` (in `.grad`) and `g_b` (a buffer) are accumulated over the micro-batches of
      the optimizer step with the same scaling as the task loss; the dropout is applied once, to the accumulated
      gradients, after the last micro-batch.
    - **DDP**: `g_a` is all-reduced by DDP, `g_b` explicitly (`all_reduce` then divided by the world size), and `U` is
      drawn from a generator seeded with `(seed, global_step)`, identical on every rank -- so every rank applies the
      same gradient. The seed makes a resumed run draw the same `U` without extra state.

    Args:
        graddrop_lambda (`float`, defaults to `1.0`): in [0, 1]; 0 is plain training (the knowledge pass is skipped).
        temperature (`float`, defaults to `1.0`): of the soft cross-entropy.
        seed (`int`, *optional*): seed of `U`; defaults to the trainer's `args.seed`.
    """

    name = "gradient_dropout"
    owns_step = True

    def __init__(self, graddrop_lambda: float = 1.0, temperature: float = 1.0, seed: int | None = None):
        if not (isinstance(graddrop_lambda, (int, float)) and 0.0 <= graddrop_lambda <= 1.0):
            raise ValueError(f"GradientDropout: `graddrop_lambda` must be in [0, 1], got {graddrop_lambda!r}.")
        if not temperature > 0:
            raise ValueError(f"GradientDropout: `temperature` must be > 0, got {temperature!r}.")
        self.graddrop_lambda = float(graddrop_lambda)
        self.temperature = float(temperature)
        self.seed = seed
        self._knowledge_grads: list[torch.Tensor] | None = None

    def setup(self, trainer) -> None:
        if self.seed is None:
            self.seed = int(trainer.args.seed)
        if not _trainable_scores(trainer.model):
            raise ValueError("GradientDropout needs a model with trainable mask-tuning scores (MaskTuningConfig).")

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.graddrop_lambda == 0.0:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return trainer.scaled_backward(loss, num_items_in_batch)

        peft_model = trainer.accelerator.unwrap_model(model)
        scores = _trainable_scores(peft_model)
        ga_steps = (
            getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        )
        with torch.no_grad(), peft_model.disable_adapter(), trainer.compute_loss_context_manager():
            teacher_logits = model(**inputs)["logits"]
        with trainer.compute_loss_context_manager():
            loss, outputs = trainer.compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            knowledge_loss = soft_cross_entropy(outputs["logits"], teacher_logits, self.temperature) / ga_steps
        grads = torch.autograd.grad(knowledge_loss, scores, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(scores, grads)]
        if self._knowledge_grads is None:
            self._knowledge_grads = grads
        else:
            torch._foreach_add_(self._knowledge_grads, grads)
        del outputs, knowledge_loss
        loss = trainer.scaled_backward(loss, num_items_in_batch)

        if trainer.accelerator.sync_gradients:  # last micro-batch of the optimizer step
            knowledge, self._knowledge_grads = self._knowledge_grads, None
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for g in knowledge:
                    dist.all_reduce(g)
                torch._foreach_div_(knowledge, dist.get_world_size())
            generator = torch.Generator(device=scores[0].device)
            generator.manual_seed(self.seed * 1_000_003 + trainer.state.global_step)
            for score, g_b in zip(scores, knowledge):
                if score.grad is None:
                    continue
                uniform = torch.rand(score.shape, generator=generator, device=score.device, dtype=score.grad.dtype)
                score.grad = gradient_dropout(score.grad, g_b, self.graddrop_lambda, uniform)
        return loss

    def state_dict(self) -> dict:
        # U is a function of (seed, global_step) and the g_b buffer is empty at every checkpoint
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
