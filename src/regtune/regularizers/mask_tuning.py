"""R-AMT's training regularizers for mask tuning: the score penalty, gradient dropout, and the mask-flip monitor.

What they compute, and the decisions taken (teacher, diagnostics): docs/mask_tuning.md.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from regtune._sharding import forward_tensors, full, is_sharded, shard_like
from regtune.functional.masks import (
    gradient_dropout,
    gradient_dropout_keep,
    pack_mask,
    score_penalty,
    soft_cross_entropy,
    unpack_mask,
)
from regtune.tuners.mask_tuning.layer import MaskTuningLayer
from regtune.tuners.mask_tuning.model import MaskTuningModel
from regtune.tuners.mask_tuning.settings import DEFAULTS, check_number, raise_if_errors

from .base import Regularizer


logger = logging.getLogger(__name__)

SCORE_PARAM = "masktune_scores"
_PEFT_PREFIX = "base_model.model."


def _trainable_scores(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if SCORE_PARAM in n and p.requires_grad]


def _mask_tuning_model(model: torch.nn.Module) -> MaskTuningModel | None:
    """The [`MaskTuningModel`] of a peft model (or the model itself), else `None`."""
    if isinstance(model, MaskTuningModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, MaskTuningModel) else None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode, then restore each module's own `training` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class MaskScorePenalty(Regularizer):
    """
    `weight * sum_l ||S_l||_2` (unsquared) over the trainable mask scores, added to the task loss
    ([R-AMT](https://huggingface.co/papers/2307.15049), weight 1e-4).

    Args:
        weight (`float`, defaults to `1e-4`): a finite number >= 0 (the `score_l2_weight` knob).
    """

    name = "mask_score_penalty"

    def __init__(self, weight: float = DEFAULTS["score_l2_weight"]):
        raise_if_errors(
            type(self).__name__, [e for e in [check_number("score_l2_weight", weight, label="weight")] if e]
        )
        self.weight = float(weight)

    def loss_term(self, model, inputs, outputs):
        scores = _trainable_scores(model)
        if not scores or self.weight == 0.0:
            return None
        return self.weight * full(score_penalty(scores))  # FSDP2: a global norm over the shards, as a plain tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the local shard of an FSDP2 `DTensor`, else the tensor itself)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _score_entries(model: torch.nn.Module) -> list[tuple[str, MaskTuningLayer, str, torch.nn.Parameter]]:
    """`(module name, layer, adapter name, scores)` of every trainable score tensor, in `named_parameters` order."""
    entries = []
    for module_name, module in model.named_modules():
        if isinstance(module, MaskTuningLayer):
            for adapter, scores in module.masktune_scores.items():
                if scores.requires_grad:
                    entries.append((module_name.removeprefix(_PEFT_PREFIX), module, adapter, scores))
    return entries


def _logits(outputs, who: str) -> torch.Tensor:
    logits = outputs.get("logits") if hasattr(outputs, "get") else outputs
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"GradientDropout: the knowledge loss is a soft cross-entropy between the logits of the model and of its "
            f"teacher, but the {who}'s output has no `logits` (got {type(outputs).__name__}). A trainer or model that "
            "computes its loss without logits (e.g. a fused cross-entropy kernel) cannot be used with gradient dropout; "
            "set graddrop_lambda=0 or return logits."
        )
    return logits


class GradientDropout(Regularizer):
    """
    R-AMT's gradient dropout ([paper](https://huggingface.co/papers/2307.15049)): the task gradient `g_a` of each
    mask score survives elementwise with a probability that measures its agreement with the knowledge gradient
    `g_b` -- the gradient of the soft cross-entropy (temperature 1) between the model and its **teacher**. See
    [`regtune.functional.masks.gradient_dropout`] and docs/mask_tuning.md.

    The teacher ([`GradientDropout.teacher_logits`]) is the same model with every mask off -- the pre-trained weights
    -- and every other module in its *current* state, in particular a trained classifier head (`modules_to_save`):
    R-AMT's teacher is zero-shot CLIP, whose classifier (the text features) is the student's. It runs without
    gradient and in eval mode (no dropout), so it is deterministic and consumes no random numbers: the student's
    dropout masks are the ones it would draw without gradient dropout. (peft's `disable_adapter()` is not used: it
    also swaps a `modules_to_save` head back to its initial weights, which would distill an untrained head.) No second
    copy of the model is kept.

    Per micro-batch: one teacher forward (no grad, eval mode), one forward of the model, `g_b` by
    `torch.autograd.grad` over the scores, then the usual backward of the task loss (which includes any loss term,
    e.g. [`MaskScorePenalty`]). Other trainable parameters (a classifier head) get `g_a` unchanged.

    Semantics (tested):

    - **Gradient accumulation**: `g_a` (in `.grad`) and `g_b` (a buffer) are accumulated over the micro-batches of
      the optimizer step with the same scaling as the task loss; the dropout is applied once, to the accumulated
      gradients, after the last micro-batch.
    - **DDP**: `g_a` is all-reduced by DDP, `g_b` explicitly (`all_reduce` then divided by the world size), and `U` is
      drawn from a generator seeded with `(seed, global_step)`, identical on every rank -- so every rank applies the
      same gradient. The seed makes a resumed run draw the same `U` without extra state.
    - **FSDP2**: `g_b` is taken with respect to the unsharded scores the forward used, reduced like under DDP, and
      `g_b` and `U` are then laid out like each (sharded) gradient.

    Diagnostics (logged as `gradient_dropout/<key>`): `drop_fraction`, the share of nonzero task-gradient entries
    whose Bernoulli draw dropped them (scaled by `1 - graddrop_lambda`), and `knowledge_loss`, the mean soft
    cross-entropy to the teacher, both since the last log (this process's shard under FSDP2).

    Args:
        graddrop_lambda (`float`, defaults to `1.0`): in [0, 1]; 0 is plain training (the knowledge pass is skipped).
        temperature (`float`, defaults to `1.0`): of the soft cross-entropy; a finite number > 0.
        seed (`int`, *optional*): seed of `U` (an int >= 0); defaults to the trainer's `args.seed`.

    Raises:
        `ValueError`: at construction, naming every invalid argument; when training starts, where no meaningful
            teacher exists (no mask-tuning adapter, no trainable scores, or trainable base weights under the masks,
            which would make "the masks off" a moving model); at the first step, when the model's output has no
            `logits`.
    """

    name = "gradient_dropout"
    owns_step = True

    def __init__(
        self,
        graddrop_lambda: float = DEFAULTS["graddrop_lambda"],
        temperature: float = DEFAULTS["graddrop_temperature"],
        seed: int | None = None,
    ):
        errors = [
            check_number("graddrop_lambda", graddrop_lambda),
            check_number("graddrop_temperature", temperature, label="temperature"),
        ]
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            errors.append(f"`seed` must be None or an int >= 0, got {seed!r}")
        raise_if_errors(type(self).__name__, [e for e in errors if e])
        self.graddrop_lambda = float(graddrop_lambda)
        self.temperature = float(temperature)
        self.seed = seed
        self._knowledge_grads: list[torch.Tensor] | None = None
        self._reset_diagnostics()

    def _reset_diagnostics(self) -> None:
        self._dropped: torch.Tensor | None = None
        self._entries: torch.Tensor | None = None
        self._knowledge_sum: torch.Tensor | None = None
        self._micro_batches = 0

    # ---- the teacher ----

    @staticmethod
    def check_teacher(model: torch.nn.Module) -> None:
        """Raise a `ValueError` saying why, where `model` (unwrapped) has no meaningful gradient-dropout teacher."""
        if _mask_tuning_model(model) is None:
            raise ValueError(
                "GradientDropout needs a peft model with a mask-tuning adapter (get_peft_model(model, "
                f"MaskTuningConfig(...))), got {type(model).__name__}: its teacher is that model with its masks off."
            )
        if not _trainable_scores(model):
            raise ValueError(
                "GradientDropout needs trainable mask-tuning scores (MaskTuningConfig): the model has none, so there "
                "is no gradient to drop."
            )
        trained = [
            name.removeprefix(_PEFT_PREFIX)
            for name, m in model.named_modules()
            if isinstance(m, MaskTuningLayer) and m.get_base_layer().weight.requires_grad
        ]
        if trained:
            raise ValueError(
                "GradientDropout has no meaningful teacher: the teacher is the pre-trained model (every mask off), but "
                f"the base weights under the masks of {trained[:3]}{' ...' if len(trained) > 3 else ''} are trainable, "
                "so the model with its masks off would drift as it trains. Freeze them (peft does by default) or "
                "train without gradient dropout (graddrop_lambda=0)."
            )

    def teacher_logits(
        self, model: torch.nn.Module, inputs: dict, autocast: contextlib.AbstractContextManager | None = None
    ) -> torch.Tensor:
        """
        The teacher's logits for `inputs`: `model` (a peft model, unwrapped) with every mask off, every other module in
        its current state (a trained head included), in eval mode, without gradient. The modules' train/eval flags are
        restored afterwards.

        Args:
            model (`torch.nn.Module`): the peft model with a mask-tuning adapter.
            inputs (`dict`): the micro-batch (keyword arguments of the forward).
            autocast (`contextlib.AbstractContextManager`, *optional*): entered around the forward (the trainer's
                `compute_loss_context_manager()`), so that teacher and student run in the same precision.
        """
        tuner = _mask_tuning_model(model)
        if tuner is None:
            self.check_teacher(model)
        with torch.no_grad(), _eval_mode(model), tuner.masks_disabled(), autocast or contextlib.nullcontext():
            outputs = model(**inputs)
        return _logits(outputs, "teacher").detach()

    # ---- the step ----

    def setup(self, trainer) -> None:
        if self.seed is None:
            self.seed = int(trainer.args.seed)
        self.check_teacher(trainer.accelerator.unwrap_model(trainer.model))
        self._knowledge_grads = None
        self._reset_diagnostics()

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.graddrop_lambda == 0.0:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return trainer.scaled_backward(loss, num_items_in_batch)

        peft_model = trainer.accelerator.unwrap_model(model)
        entries = _score_entries(peft_model)
        scores = [scores for *_, scores in entries]
        ga_steps = (
            getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        )
        teacher = self.teacher_logits(peft_model, inputs, trainer.compute_loss_context_manager())
        # the tensors the forward uses: the scores themselves, or their unsharded copies under FSDP2
        owners = [(layer, lambda m, a=adapter: m.masktune_scores[a]) for _, layer, adapter, _ in entries]
        with forward_tensors(owners) as seen, trainer.compute_loss_context_manager():
            loss, outputs = trainer.compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            knowledge_loss = soft_cross_entropy(_logits(outputs, "model"), teacher, self.temperature)
        targets = [t if t is not None else s for t, s in zip(seen, scores)]
        grads = torch.autograd.grad(knowledge_loss / ga_steps, targets, retain_graph=True, allow_unused=True)
        grads = [
            torch.zeros(s.shape, dtype=s.dtype, device=s.device) if g is None else _local_full(g)
            for s, g in zip(scores, grads)
        ]
        if self._knowledge_grads is None:
            self._knowledge_grads = grads
        else:
            torch._foreach_add_(self._knowledge_grads, grads)
        if self.log_diagnostics:
            value = knowledge_loss.detach().float()
            self._knowledge_sum = value if self._knowledge_sum is None else self._knowledge_sum + value
            self._micro_batches += 1
        del outputs, knowledge_loss
        loss = trainer.scaled_backward(loss, num_items_in_batch)

        if trainer.accelerator.sync_gradients:  # last micro-batch of the optimizer step
            self._apply(scores, trainer.state.global_step)
        return loss

    def _apply(self, scores: list[torch.Tensor], global_step: int) -> None:
        knowledge, self._knowledge_grads = self._knowledge_grads, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every process computed g_b on its own micro-batches (full tensors): the mean, as DDP does for g_a
            for g in knowledge:
                dist.all_reduce(g)
            torch._foreach_div_(knowledge, dist.get_world_size())
        generator = torch.Generator(device=knowledge[0].device)
        generator.manual_seed(self.seed * 1_000_003 + global_step)
        dropped, entries = [], []
        for score, g_b in zip(scores, knowledge):
            if score.grad is None:
                continue
            # U over the full shape from the shared generator: identical on every process, then laid out like .grad
            uniform = torch.rand(score.shape, generator=generator, device=g_b.device, dtype=score.grad.dtype)
            g_b, uniform = shard_like(g_b.to(score.grad.dtype), score.grad), shard_like(uniform, score.grad)
            keep = gradient_dropout_keep(score.grad, g_b, uniform)
            if self.log_diagnostics:  # device-side counts, read when the Trainer logs
                nonzero = _local(score.grad) != 0
                dropped.append((nonzero & (_local(keep) == 0)).sum())
                entries.append(nonzero.sum())
            score.grad = gradient_dropout(score.grad, g_b, self.graddrop_lambda, uniform, keep=keep)
        if dropped:
            step_dropped, step_entries = torch.stack(dropped).sum(), torch.stack(entries).sum()
            self._dropped = step_dropped if self._dropped is None else self._dropped + step_dropped
            self._entries = step_entries if self._entries is None else self._entries + step_entries

    # ---- diagnostics and state ----

    def diagnostics(self) -> dict[str, float]:
        if not self.log_diagnostics:
            return {}
        out: dict[str, float] = {}
        if self._entries is not None:
            dropped, entries = torch.stack([self._dropped, self._entries]).double().tolist()  # one sync, at log time
            out["drop_fraction"] = dropped / entries if entries else 0.0
        if self._knowledge_sum is not None and self._micro_batches:
            out["knowledge_loss"] = float(self._knowledge_sum.item()) / self._micro_batches
        self._reset_diagnostics()
        return out

    def state_dict(self) -> dict:
        # U is a function of (seed, global_step) and the g_b buffer is empty at every checkpoint
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]


def _local_full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient with respect to a forward tensor: plain already (the unsharded copy under FSDP2)."""
    return grad.full_tensor() if is_sharded(grad) else grad


class MaskFlipMonitor(Regularizer):
    """
    The diagnostic of mask tuning's mechanism: how many mask entries have flipped since training started, logged as
    Trainer metrics `mask_tuning/flipped` (the share over all masked weights), `mask_tuning/flipped/<layer>` (per
    masked layer, with `per_layer=True`) and `mask_tuning/zero_fraction` (the share of mask entries that are 0).

    At the start of training (`setup`) it keeps each mask bit-packed (1 bit per entry, 1/32 of the scores' memory);
    when the Trainer logs, it compares the current masks with them. Nothing is computed inside the training steps.
    The reference masks are part of its state, so a resumed run keeps counting from the original start. Under DDP the
    masks are identical on every process; under FSDP2 each process compares its own shard (the logged values are
    the main process's).

    [`regtune.MaskTuningTrainer`] adds it; add it to any other trainer's `regularizers` to get the same metrics.

    Args:
        per_layer (`bool`, defaults to `True`): also log the flipped share of every masked layer.
    """

    name = "mask_tuning"

    def __init__(self, per_layer: bool = True):
        if not isinstance(per_layer, bool):
            raise ValueError(f"MaskFlipMonitor: `per_layer` must be True or False, got {per_layer!r}.")
        self.per_layer = per_layer
        self._layers: dict[str, tuple[MaskTuningLayer, str]] = {}
        self._reference: dict[str, torch.Tensor] = {}

    def _masks(self) -> dict[str, torch.Tensor]:
        return {
            key: _local(layer.masktune_scores[adapter].detach()) > layer.masktune_threshold[adapter]
            for key, (layer, adapter) in self._layers.items()
        }

    def setup(self, trainer) -> None:
        entries = _score_entries(trainer.accelerator.unwrap_model(trainer.model))
        if not entries:
            raise ValueError("MaskFlipMonitor needs a model with trainable mask-tuning scores (MaskTuningConfig).")
        several = len({adapter for *_, adapter, _ in entries}) > 1
        self._layers = {
            (f"{name}[{adapter}]" if several else name): (layer, adapter) for name, layer, adapter, _ in entries
        }
        self._reference = {key: pack_mask(mask) for key, mask in self._masks().items()}

    def diagnostics(self) -> dict[str, float]:
        if not self.log_diagnostics or not self._layers:
            return {}
        masks = self._masks()
        flipped = [(mask != unpack_mask(self._reference[key], mask.shape)).sum() for key, mask in masks.items()]
        zeros = torch.stack([(~mask).sum() for mask in masks.values()]).sum()
        counts = torch.stack([*flipped, zeros]).double().tolist()  # one host sync, at log time
        sizes = [mask.numel() for mask in masks.values()]
        total = sum(sizes)
        out = {"flipped": sum(counts[:-1]) / total, "zero_fraction": counts[-1] / total}
        if self.per_layer:
            out.update({f"flipped/{key}": n / size for key, n, size in zip(masks, counts[:-1], sizes)})
        return out

    def state_dict(self) -> dict:
        return {"reference": dict(self._reference)}

    def load_state_dict(self, state: dict) -> None:
        reference = state.get("reference", {})
        if set(reference) != set(self._layers):
            logger.warning(
                "MaskFlipMonitor: the checkpoint's masked layers differ from the model's; counting flips from the "
                "start of this run instead."
            )
            return
        self._reference = dict(reference)
