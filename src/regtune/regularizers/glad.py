"""GLAD's SAM-referenced gradient as a step-owning regularizer, usable with any adapter or full fine-tuning."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from regtune._deprecation import renamed_argument
from regtune._rng import capture_rng, restore_rng, same_rng
from regtune._sharding import foreach_copy_
from regtune.functional.glad import glad_combine_, glad_save_and_perturb_, low_precision
from regtune.tuners.glad.settings import GLADSettings, bool_error, raise_field_errors

from .base import Regularizer


class GLADRegularizer(Regularizer):
    """
    GLAD: steer the gradient towards the sharpness-aware (SAM) gradient
    ([paper](https://huggingface.co/papers/2507.13089); the rule and its decisions are described in docs/glad.md):

        g = grad L(theta),  eps = rho * g / ||g||,  g_sam = grad L(theta + eps),  g_final = g + lambda * (g_sam - g)

    `lambda = 0` is plain training (the second pass is skipped, so the run is bit for bit the plain one) and
    `lambda = 1` is SAM. It owns the training step and acts on every trainable parameter, so it works with LoRA,
    ALLoRA, mask tuning or full fine-tuning.

    Semantics (tested):

    - **Dropout**: with `share_dropout_masks=True` (the default, as in the reference SAM implementation, which draws
      both passes' dropout from one random key) the second pass replays the random-number state of the first pass
      of each micro-batch (CPU and the model's accelerator), so both passes drop the same units and `g_sam - g`
      measures the perturbation, not dropout noise; the random state after the step is the one after the first
      pass, so the rest of the run draws exactly what plain training draws. A first pass that drew no random
      numbers (a model without dropout) keeps no state. `False` draws fresh masks.
    - **Gradient accumulation**: the perturbation uses the accumulated gradient of the whole optimizer step. The
      micro-batches of the step are kept; after the last one's ordinary backward, the parameters are perturbed,
      all micro-batches are run again (forward + backward) to get `g_sam`, the parameters are restored exactly (a
      copy, not `theta + eps - eps`) and the combined gradient is left in `.grad` for the optimizer step.
    - **DDP**: the last micro-batch's backward is all-reduced, so `g` (and `eps`) is the global batch's gradient and
      identical on every rank; the second pass accumulates `g_sam` into fresh gradient buffers and is all-reduced
      the same way (`no_sync` on all but its last micro-batch), so `g_sam` is global too. Each process keeps only
      its own micro-batches.
    - **Memory**: one copy of the trainable parameters during the step (`theta`, for the exact restore), no copy of
      the gradients: the gradient buffers of the first pass hold `eps` while the parameters are perturbed and are
      then dropped, the second backward fills fresh ones (as a plain backward does), and `g` is recovered from the
      perturbed parameters, `(theta + eps - theta) / scale` (see [`regtune.functional.glad`]; parameters below
      float32 keep their `g` instead). Nothing is kept between steps but the diagnostics' two scalars.
    - **Diagnostics** (`log_diagnostics=True`): `glad/cos_g_gsam` = cos(g, g_sam) and `glad/rel_diff` =
      ||g_sam - g|| / ||g||, averaged over the optimizer steps since the last log, as Trainer metrics. They are
      accumulated as device tensors (no host synchronisation inside steps).

    Args:
        glad_rho (`float`, *optional*): SAM radius (> 0); default: `settings.rho`, else 0.05. (`rho=` is its
            deprecated spelling.)
        glad_lambda (`float`, *optional*): weight of the SAM reference, in [0, 1]; default: `settings.glad_lambda`,
            else 0.5.
        glad_share_dropout_masks (`bool`, *optional*): whether both passes use the same dropout masks; default:
            `settings.share_dropout_masks`, else `True`. (`share_dropout_masks=` is its deprecated spelling.)
        settings ([`GLADSettings`], *optional*): all three at once (explicit arguments win).

    The arguments have the names of [`GLADTrainingArguments`]' fields and of a recipe's `training:` keys (one name
    per knob, docs/regularizers.md).
        log_diagnostics (`bool`, defaults to `True`): whether to compute and log the diagnostics.
    """

    name = "glad"
    owns_step = True

    def __init__(
        self,
        glad_rho: float | None = None,
        glad_lambda: float | None = None,
        *,
        glad_share_dropout_masks: bool | None = None,
        settings: GLADSettings | None = None,
        log_diagnostics: bool = True,
        rho: float | None = None,
        share_dropout_masks: bool | None = None,
    ):
        rho, rho_name = renamed_argument("GLADRegularizer", "rho", "glad_rho", rho, glad_rho)
        share_dropout_masks, share_name = renamed_argument(
            "GLADRegularizer", "share_dropout_masks", "glad_share_dropout_masks", share_dropout_masks,
            glad_share_dropout_masks,
        )  # fmt: skip
        errors = [bool_error("log_diagnostics", log_diagnostics)]
        if settings is not None and not isinstance(settings, GLADSettings):
            errors.append(f"`settings` = {settings!r} (allowed: None or a GLADSettings)")
            settings = None
        explicit = {"rho": rho, "glad_lambda": glad_lambda, "share_dropout_masks": share_dropout_masks}
        explicit = {key: value for key, value in explicit.items() if value is not None}
        errors += GLADSettings.field_errors(explicit, {"rho": rho_name, "share_dropout_masks": share_name})
        raise_field_errors("GLADRegularizer", errors)
        self.settings: GLADSettings = (settings or GLADSettings()).replace(**explicit)
        self.log_diagnostics = log_diagnostics
        self._window: list[tuple[dict[str, Any], Any, dict[str, Any] | None]] = []
        self._diag_sum: torch.Tensor | None = None  # (cos, rel_diff) summed over steps, on device
        self._diag_steps = 0
        self._params_cache: tuple[weakref.ref, list[torch.Tensor]] | None = None

    # the settings' fields, under their public names
    @property
    def glad_rho(self) -> float:
        return self.settings.rho

    @property
    def glad_share_dropout_masks(self) -> bool:
        return self.settings.share_dropout_masks

    @property
    def rho(self) -> float:
        return self.settings.rho

    @property
    def glad_lambda(self) -> float:
        return self.settings.glad_lambda

    @property
    def share_dropout_masks(self) -> bool:
        return self.settings.share_dropout_masks

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        glad_rho: float | None = None,
        glad_lambda: float | None = None,
        *,
        glad_share_dropout_masks: bool | None = None,
        log_diagnostics: bool = True,
    ) -> GLADRegularizer:
        """Build from the [`GLADSettings`] recorded in the model's [`GLADConfig`] (explicit arguments win)."""
        return cls(
            glad_rho,
            glad_lambda,
            glad_share_dropout_masks=glad_share_dropout_masks,
            settings=GLADSettings.from_model(model),
            log_diagnostics=log_diagnostics,
        )

    def _parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """`model`'s parameters, listed once per model (walking the modules costs milliseconds per step on a peft
        model; the trainable ones are still selected at every step)."""
        cached = self._params_cache
        if cached is None or cached[0]() is not model:
            cached = self._params_cache = (weakref.ref(model), list(model.parameters()))
        return cached[1]

    def _loss_and_backward(self, trainer, model, inputs, num_items_in_batch) -> torch.Tensor:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return trainer.scaled_backward(loss, num_items_in_batch)

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        settings = self.settings
        if settings.glad_lambda == 0.0:
            return self._loss_and_backward(trainer, model, inputs, num_items_in_batch)
        device = getattr(trainer.args, "device", None) if settings.share_dropout_masks else None
        rng = capture_rng(device) if settings.share_dropout_masks else None
        loss = self._loss_and_backward(trainer, model, inputs, num_items_in_batch)
        if rng is not None and same_rng(rng, capture_rng(device)):
            rng = None  # the pass drew no random numbers (no dropout): nothing to replay, nothing to keep
        self._window.append((inputs, num_items_in_batch, rng))
        if not trainer.accelerator.sync_gradients:  # not the last micro-batch of this optimizer step
            return loss
        window, self._window = self._window, []

        params = [p for p in self._parameters(model) if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        keep = [low_precision(p) for p in params]
        saved, grad_norm, scale = glad_save_and_perturb_(params, grads, settings.rho, keep=keep)
        # g is recovered from the perturbed parameters after the second pass (kept only below float32): the
        # buffers are dropped, so that the second backward fills fresh ones, as a plain backward does
        kept = [g if k else None for g, k in zip(grads, keep)]
        del grads
        for p in params:
            p.grad = None
        replay = any(batch_rng is not None for *_, batch_rng in window)
        after_first_pass = capture_rng(device) if replay else None
        try:
            for index, (batch, items, batch_rng) in enumerate(window):
                last = index == len(window) - 1
                if batch_rng is not None:
                    restore_rng(batch_rng)
                with trainer.accelerator.no_sync(model) if not last else torch.enable_grad():
                    self._loss_and_backward(trainer, model, batch, items)
        except BaseException:
            foreach_copy_(params, saved)  # never leave the weights perturbed
            raise
        finally:
            if after_first_pass is not None:
                restore_rng(after_first_pass)
        for p in params:
            if p.grad is None:  # no gradient at the perturbed point
                p.grad = torch.zeros_like(p)
        sam_grads = [p.grad for p in params]
        values = glad_combine_(
            params,
            saved,
            sam_grads,
            scale,
            settings.glad_lambda,
            kept_grads=kept,
            grad_norm=grad_norm if self.log_diagnostics else None,
        )
        if values is not None:
            values = torch.stack(values)
            self._diag_sum = values if self._diag_sum is None else self._diag_sum + values
            self._diag_steps += 1
        return loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """`cos_g_gsam` (cos(g, g_sam)) and `rel_diff` (||g_sam - g|| / ||g||), averaged over the optimizer steps
        since the last call; `{}` when `log_diagnostics` is off or no perturbed step ran."""
        if not self.log_diagnostics or self._diag_sum is None:
            return {}
        mean = self._diag_sum / self._diag_steps
        self._diag_sum, self._diag_steps = None, 0
        return {"cos_g_gsam": mean[0], "rel_diff": mean[1]}

    def state_dict(self) -> dict:
        # the micro-batch window is empty at every checkpoint (checkpoints follow optimizer steps)
        settings = self.settings
        return {
            "rho": settings.rho,
            "glad_lambda": settings.glad_lambda,
            "share_dropout_masks": settings.share_dropout_masks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.settings = GLADSettings(
            rho=state["rho"],
            glad_lambda=state["glad_lambda"],
            share_dropout_masks=state.get("share_dropout_masks", self.settings.share_dropout_masks),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings}, log_diagnostics={self.log_diagnostics})"
