"""GLAD's SAM-referenced gradient as a step-owning regularizer, usable with any adapter or full fine-tuning."""

from __future__ import annotations

from typing import Any

import torch

from regtune.functional.sam import sam_perturbation, sam_referenced_gradient

from .base import Regularizer


class GLADRegularizer(Regularizer):
    """
    GLAD: steer the gradient towards the Sharpness-Aware Minimization gradient
    ([paper](https://huggingface.co/papers/2507.13089); the exact rule is not public, METHODS.md §3 fixes it):

        g = grad L(theta),  eps = rho * g / ||g||,  g_sam = grad L(theta + eps),  g_final = g + lambda * (g_sam - g)

    `lambda = 0` is plain training (the second pass is skipped, so the run is bit for bit the plain one) and
    `lambda = 1` is SAM. It owns the training step and acts on every trainable parameter, so it works with LoRA,
    ALLoRA, mask tuning or full fine-tuning.

    Semantics (tested):

    - **Gradient accumulation**: the perturbation uses the accumulated gradient of the whole optimizer step. The
      micro-batches of the step are kept; after the last one's ordinary backward, the parameters are perturbed,
      all micro-batches are run again (forward + backward) to get `g_sam`, the parameters are restored exactly (a
      copy, not `theta + eps - eps`) and the combined gradient is left in `.grad` for the optimizer step.
    - **DDP**: the last micro-batch's backward is all-reduced, so `g` (and `eps`) is the global batch's gradient and
      identical on every rank; the second pass is all-reduced the same way (`no_sync` on all but its last
      micro-batch), so `g_sam` is global too. Each process keeps only its own micro-batches.
    - **Cost**: two forward/backward passes per optimizer step, one copy of the trainable parameters and of their
      gradients. The only reduction is one global gradient norm, kept on device (no host sync).

    Args:
        rho (`float`, defaults to `0.05`): SAM radius (> 0).
        glad_lambda (`float`, defaults to `0.5`): weight of the SAM reference, in [0, 1].
    """

    name = "glad"
    owns_step = True

    def __init__(self, rho: float = 0.05, glad_lambda: float = 0.5):
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"GLADRegularizer: `rho` must be a number > 0, got {rho!r}.")
        if not (isinstance(glad_lambda, (int, float)) and 0.0 <= glad_lambda <= 1.0):
            raise ValueError(f"GLADRegularizer: `glad_lambda` must be in [0, 1], got {glad_lambda!r}.")
        self.rho = float(rho)
        self.glad_lambda = float(glad_lambda)
        self._window: list[tuple[dict[str, Any], Any]] = []

    @classmethod
    def from_model(cls, model: torch.nn.Module, rho: float | None = None, glad_lambda: float | None = None):
        """Build from the knobs recorded in the model's [`GLADConfig`] (explicit arguments win)."""
        config = next(iter(getattr(model, "peft_config", {}).values()), None)
        kwargs = {}
        if config is not None and hasattr(config, "glad_lambda"):
            kwargs = {"rho": config.rho, "glad_lambda": config.glad_lambda}
        if rho is not None:
            kwargs["rho"] = rho
        if glad_lambda is not None:
            kwargs["glad_lambda"] = glad_lambda
        return cls(**kwargs)

    def _loss_and_backward(self, trainer, model, inputs, num_items_in_batch) -> torch.Tensor:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return trainer.scaled_backward(loss, num_items_in_batch)

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = self._loss_and_backward(trainer, model, inputs, num_items_in_batch)
        if self.glad_lambda == 0.0:
            return loss
        self._window.append((inputs, num_items_in_batch))
        if not trainer.accelerator.sync_gradients:  # not the last micro-batch of this optimizer step
            return loss
        window, self._window = self._window, []

        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_add_(params, sam_perturbation(grads, self.rho))
        for p in params:
            p.grad = None
        for index, (batch, items) in enumerate(window):
            last = index == len(window) - 1
            sync = trainer.accelerator.no_sync(model) if not last else torch.enable_grad()
            with sync:
                self._loss_and_backward(trainer, model, batch, items)
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
            sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            for p, g in zip(params, sam_referenced_gradient(grads, sam_grads, self.glad_lambda)):
                p.grad = g
        return loss

    def state_dict(self) -> dict:
        # the micro-batch window is empty at every checkpoint (checkpoints follow optimizer steps)
        return {"rho": self.rho, "glad_lambda": self.glad_lambda}

    def load_state_dict(self, state: dict) -> None:
        self.rho, self.glad_lambda = float(state["rho"]), float(state["glad_lambda"])
