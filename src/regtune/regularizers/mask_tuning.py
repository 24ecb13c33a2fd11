"""R-AMT's training regularizers for mask tuning: the score penalty, gradient dropout, and the mask-flip monitor.

What they compute, and the decisions taken (teacher, diagnostics): docs/mask_tuning.md.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
import torch.distributed as dist

from regtune._deprecation import renamed_argument
from regtune._sharding import forward_tensors, full, is_sharded, shard_like
from regtune.functional.masks import (
    apply_gradient_dropout_,
    gradient_dropout_keep_,
    knowledge_logit_grad,
    pack_mask,
    score_penalty,
    unpack_mask,
)
from regtune.tuners.mask_tuning.config import QKV_PROJECTIONS
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


# multiplying a byte by this (0x8040201008040201 as a signed int64) and shifting right by 7 moves its bit 7 - k to
# bit 8 k (no two partial products overlap, so there is no carry): it spreads a `pack_mask` byte into 8 bytes of 0/1,
# the layout of 8 consecutive booleans read as one little-endian int64
_SPREAD = sum(1 << (9 * k) for k in range(8)) - (1 << 64)
_LOW_BITS = 0x0101010101010101


def count_flips(mask: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """
    The number of entries where the boolean `mask` differs from `unpack_mask(packed, mask.shape)`, a 0-d int64
    tensor, without unpacking: the reference bytes are spread to one byte per entry in int64 words (8 entries per
    operation), XOR-ed with the mask's bytes read as int64 words, and the nonzero bytes counted.
    """
    flat = mask.reshape(-1)
    main = flat.numel() // 8 * 8
    count = torch.zeros((), dtype=torch.int64, device=mask.device)
    if main and sys.byteorder == "little" and flat.storage_offset() % 8 == 0:
        words = flat[:main].view(torch.uint8).view(torch.int64)
        spread = packed[: main // 8].to(torch.int64).mul_(_SPREAD).bitwise_right_shift_(7).bitwise_and_(_LOW_BITS)
        count = torch.count_nonzero(spread.bitwise_xor_(words).view(torch.bool))
    else:
        main = 0
    if main < flat.numel():
        rest = unpack_mask(packed, flat.shape)[main:]
        count = count + (flat[main:] != rest).sum()
    return count


# entries per chunk of the gradient-dropout rule (U is drawn in these chunks, in order)
_DROPOUT_CHUNK = 1 << 18


def _uniform_generator(seed: int, global_step: int, index: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(_uniform_seed(seed, global_step, index))
    return generator


def _uniform_seed(seed: int, global_step: int, index: int) -> int:
    """The seed of `U` for score tensor `index` at optimizer step `global_step`: one generator per tensor, so that
    every tensor's draw is the same whichever order the tensors are processed in (the backward's)."""
    return ((seed * 1_000_003 + global_step) * 1_000_033 + index) % (1 << 63)


class MaskScorePenalty(Regularizer):
    """
    `weight * sum_l ||S_l||_2` (unsquared) over the trainable mask scores, added to the task loss
    ([R-AMT](https://huggingface.co/papers/2307.15049), weight 1e-4). Where an adapter's config has
    `score_penalty_qkv="fused"` (the default on CLIP-like models), the Q, K and V projections of one attention count
    as one tensor, `||[S_q; S_k; S_v]||_2`, as the released code's fused `in_proj` mask does.

    Args:
        score_l2_weight (`float`, defaults to `1e-4`): a finite number >= 0 (the name of the knob in
            [`MaskTuningTrainingArguments`] and recipes; `weight=` is its deprecated spelling).
    """

    name = "mask_score_penalty"

    def __init__(self, score_l2_weight: float | None = None, *, weight: float | None = None):
        score_l2_weight, spelling = renamed_argument(
            "MaskScorePenalty", "weight", "score_l2_weight", weight, score_l2_weight
        )
        if score_l2_weight is None:
            score_l2_weight = DEFAULTS["score_l2_weight"]
        errors = [check_number("score_l2_weight", score_l2_weight, label=spelling)]
        raise_if_errors(type(self).__name__, [e for e in errors if e])
        self.score_l2_weight = float(score_l2_weight)
        self._fused_qkv: set[str] | None = None  # adapters whose Q, K, V share one norm; read from the model

    @staticmethod
    def _fused_qkv_adapters(model) -> set[str]:
        configs = getattr(getattr(model, "module", model), "peft_config", None) or {}
        return {name for name, c in configs.items() if getattr(c, "score_penalty_qkv", None) == "fused"}

    def setup(self, trainer) -> None:
        # the masked layers return each score tensor's norm from their forward, so that the penalty's gradient is
        # added in each layer's backward (see `MaskTuningLayer.masked_weight`)
        model = trainer.accelerator.unwrap_model(trainer.model)
        self._fused_qkv = self._fused_qkv_adapters(model)
        for module in model.modules():
            if isinstance(module, MaskTuningLayer):
                module.masktune_track_norms = self.score_l2_weight != 0.0

    def loss_term(self, model, inputs, outputs):
        if self.score_l2_weight == 0.0:
            return None
        fused_qkv = self._fused_qkv if self._fused_qkv is not None else self._fused_qkv_adapters(model)
        norms, untracked, groups = [], [], {}
        for name, layer, adapter, scores in _score_entries(model):
            norm = layer.masktune_norms.pop(adapter, None)
            tracked = norm is not None and norm.requires_grad  # from this forward, on the unsharded scores
            parent, _, leaf = name.rpartition(".")
            family = QKV_PROJECTIONS.get(leaf)
            if family is not None and adapter in fused_qkv:
                # one norm over the attention's Q, K and V scores: sqrt of the sum of their squared norms
                norm = norm if tracked else full(score_penalty([scores]))
                groups.setdefault((adapter, parent, family), []).append(norm)
            elif tracked:
                norms.append(norm)
            else:  # the layer did not run with gradient (or was not set up): the norm of the parameter
                untracked.append(scores)
        if untracked:
            norms.append(full(score_penalty(untracked)))  # FSDP2: a global norm over the shards, a plain tensor
        for group in groups.values():
            norms.append(group[0] if len(group) == 1 else torch.linalg.vector_norm(torch.stack(group).float()))
        if not norms:
            return None
        return self.score_l2_weight * torch.stack([n.float() for n in norms]).sum()


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

    Per micro-batch: one teacher forward (no grad, eval mode), one forward of the model, the knowledge loss's gradient
    at the logits in closed form (`knowledge_logit_grad`), `g_b` by one `torch.autograd.grad` from the logits to
    the scores, then the usual backward of the task loss (which includes any loss term, e.g. [`MaskScorePenalty`]).
    In one process, each score's task gradient is dropped as soon as that backward has accumulated it, and its `g_b`
    freed (see the Cost section of docs/mask_tuning.md). Other trainable parameters (a classifier head) get `g_a`
    unchanged.

    Semantics (tested):

    - **Gradient accumulation**: `g_a` (in `.grad`) and `g_b` (a buffer) are accumulated over the micro-batches of
      the optimizer step with the same scaling as the task loss; the dropout is applied once, to the accumulated
      gradients, after the last micro-batch.
    - **DDP**: `g_a` is all-reduced by DDP, `g_b` explicitly (`all_reduce` then divided by the world size), and the
      dropout is applied after the backward; `U` is drawn, for each score tensor, from a generator seeded with
      `(seed, global_step, tensor index)`, identical on every rank and whatever order the tensors are processed in
      -- so every rank applies the same gradient. The seed makes a resumed run draw the same `U` without extra state.
    - **FSDP2**: `g_b` is taken with respect to the unsharded scores the forward used, reduced like under DDP, and
      `g_b` and `U` are then laid out like each (sharded) gradient.

    Diagnostics (logged as `gradient_dropout/<key>`): `drop_fraction`, the share of nonzero task-gradient entries
    whose Bernoulli draw dropped them (scaled by `1 - graddrop_lambda`), and `knowledge_loss`, the mean soft
    cross-entropy to the teacher, both since the last log (this process's shard under FSDP2).

    Args:
        graddrop_lambda (`float`, defaults to `1.0`): in [0, 1]; 0 is plain training (the knowledge pass is skipped).
        graddrop_temperature (`float`, defaults to `1.0`): of the soft cross-entropy; a finite number > 0
            (`temperature=` is its deprecated spelling).
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
        graddrop_temperature: float | None = None,
        seed: int | None = None,
        *,
        temperature: float | None = None,
    ):
        temperature, spelling = renamed_argument(
            "GradientDropout", "temperature", "graddrop_temperature", temperature, graddrop_temperature
        )
        if temperature is None:
            temperature = DEFAULTS["graddrop_temperature"]
        errors = [
            check_number("graddrop_lambda", graddrop_lambda),
            check_number("graddrop_temperature", temperature, label=spelling),
        ]
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            errors.append(f"`seed` must be None or an int >= 0, got {seed!r}")
        raise_if_errors(type(self).__name__, [e for e in errors if e])
        self.graddrop_lambda = float(graddrop_lambda)
        self.graddrop_temperature = float(temperature)
        self.seed = seed
        self._knowledge_grads: list[torch.Tensor] | None = None
        self._reset_diagnostics()

    def _reset_diagnostics(self) -> None:
        self._counts: torch.Tensor | None = None  # (dropped, nonzero task-gradient entries), on device
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
        logits = _logits(outputs, "model")
        del outputs
        # g_b: the knowledge loss's gradient at the logits in closed form (no graph for the loss), then one backward
        # from the logits to the scores, keeping the model's graph for the task backward
        logit_grad, knowledge_loss = knowledge_logit_grad(
            logits.detach(), teacher, self.graddrop_temperature, 1.0 / ga_steps, with_loss=self.log_diagnostics
        )
        del teacher
        targets = [t if t is not None else s for t, s in zip(seen, scores)]
        grads = torch.autograd.grad(logits, targets, logit_grad, retain_graph=True, allow_unused=True)
        del logit_grad, logits
        grads = [
            torch.zeros(s.shape, dtype=s.dtype, device=s.device) if g is None else _local_full(g)
            for s, g in zip(scores, grads)
        ]
        if self._knowledge_grads is None:
            self._knowledge_grads = grads
        else:
            torch._foreach_add_(self._knowledge_grads, grads)
        del grads
        if self.log_diagnostics:
            self._knowledge_sum = (
                knowledge_loss if self._knowledge_sum is None else self._knowledge_sum + knowledge_loss
            )
            self._micro_batches += 1

        last = trainer.accelerator.sync_gradients  # last micro-batch of the optimizer step
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not last or distributed or any(is_sharded(s) for s in scores):
            # under DDP/FSDP2 the task gradient is final (reduced) only once the whole backward has run
            loss = trainer.scaled_backward(loss, num_items_in_batch)
            if last:
                self._apply(scores, trainer.state.global_step)
            return loss
        # one process: drop each score's task gradient as soon as its backward has accumulated it, and free its g_b
        # right away, so that g_a and g_b together never hold more than one copy of the scores
        knowledge, step = self._knowledge_grads, trainer.state.global_step
        self._knowledge_grads = None

        def make_hook(index):
            def hook(score):
                g_b, knowledge[index] = knowledge[index], None
                if g_b is not None and score.grad is not None:
                    self._drop_(index, score.grad, g_b, step)

            return hook

        handles = [score.register_post_accumulate_grad_hook(make_hook(i)) for i, score in enumerate(scores)]
        try:
            loss = trainer.scaled_backward(loss, num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()
        for index, score in enumerate(scores):  # a score without task gradient in this micro-batch, but earlier
            if knowledge[index] is not None and score.grad is not None:
                g_b, knowledge[index] = knowledge[index], None
                self._drop_(index, score.grad, g_b, step)
        return loss

    def _drop_(self, index: int, grad: torch.Tensor, g_b: torch.Tensor, global_step: int) -> None:
        """Apply the dropout to one score's accumulated task gradient `grad` (a plain tensor), in place, by chunks
        of entries (the temporaries stay a few MiB whatever the layer's size); `g_b` is this process's own buffer
        (overwritten)."""
        generator = _uniform_generator(self.seed, global_step, index, grad.device)
        lam = self.graddrop_lambda
        flat_grad = grad.view(-1) if grad.is_contiguous() else None
        if flat_grad is None:  # one chunk
            flat_grad, chunk = grad, grad.numel()
        else:
            chunk = _DROPOUT_CHUNK
        flat_b = g_b.to(grad.dtype).reshape(flat_grad.shape)
        del g_b
        counts = None
        for start in range(0, max(flat_grad.numel(), 1), chunk):
            task = flat_grad[start : start + chunk] if flat_grad.dim() == 1 else flat_grad
            uniform = torch.rand(task.shape, generator=generator, device=grad.device, dtype=grad.dtype)
            knowledge = flat_b[start : start + chunk] if flat_grad.dim() == 1 else flat_b
            keep = gradient_dropout_keep_(task, knowledge, uniform)
            del uniform
            if self.log_diagnostics:  # device-side counts, read when the Trainer logs
                nonzero = task != 0
                part = torch.stack([torch.count_nonzero(nonzero & ~keep), torch.count_nonzero(nonzero)])
                counts = part if counts is None else counts + part
            apply_gradient_dropout_(task, keep, lam)  # ((1 - lambda) + lambda * keep) * g_a, in place
        if counts is not None:
            self._counts = counts if self._counts is None else self._counts + counts

    def _apply(self, scores: list[torch.Tensor], global_step: int) -> None:
        """The dropout at the end of the step, on the reduced task gradients (DDP, FSDP2)."""
        knowledge, self._knowledge_grads = self._knowledge_grads, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every process computed g_b on its own micro-batches (full tensors): the mean, as DDP does for g_a
            for g in knowledge:
                dist.all_reduce(g)
            torch._foreach_div_(knowledge, dist.get_world_size())
        for index, (score, g_b) in enumerate(zip(scores, knowledge)):
            if score.grad is None:
                continue
            if not is_sharded(score.grad):
                self._drop_(index, score.grad, g_b, global_step)
                continue
            # U over the full shape from the tensor's own generator: identical on every process, then laid out
            # like .grad
            generator = _uniform_generator(self.seed, global_step, index, g_b.device)
            numel, dtype = score.numel(), score.grad.dtype
            uniform = torch.cat(
                [
                    torch.rand(min(_DROPOUT_CHUNK, numel - start), generator=generator, device=g_b.device, dtype=dtype)
                    for start in range(0, numel, _DROPOUT_CHUNK)
                ]
            ).view(score.shape)  # drawn in the chunks of `_drop_`, so that every path draws the same U
            g_b, uniform = shard_like(g_b.to(score.grad.dtype), score.grad), shard_like(uniform, score.grad)
            local_grad, local_b, local_u = _local(score.grad), _local(g_b), _local(uniform)
            keep = gradient_dropout_keep_(local_grad, local_b, local_u)
            if self.log_diagnostics:
                nonzero = local_grad != 0
                counts = torch.stack([(nonzero & ~keep).sum(), nonzero.sum()])
                self._counts = counts if self._counts is None else self._counts + counts
            apply_gradient_dropout_(local_grad, keep, self.graddrop_lambda)

    # ---- diagnostics and state ----

    def diagnostics(self) -> dict[str, float]:
        if not self.log_diagnostics:
            return {}
        values = []
        if self._counts is not None:
            values += [self._counts[0].double(), self._counts[1].double()]
        if self._knowledge_sum is not None and self._micro_batches:
            values.append(self._knowledge_sum.double())
        out: dict[str, float] = {}
        if values:
            host = torch.stack(values).tolist()  # one host sync, at log time
            if self._counts is not None:
                dropped, entries = host[0], host[1]
                out["drop_fraction"] = dropped / entries if entries else 0.0
            if self._knowledge_sum is not None and self._micro_batches:
                out["knowledge_loss"] = host[-1] / self._micro_batches
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
    Trainer metrics `mask_tuning/flipped` (the share over all masked weights), `mask_tuning/zero_fraction` (the share
    of mask entries that are 0) and, with `per_layer=True`, `mask_tuning/flipped/<layer>` (per masked layer).

    At the start of training (`setup`) it keeps each mask bit-packed (1 bit per entry, 1/32 of the scores' memory);
    when the Trainer logs, it compares the current masks with them (`count_flips`: one comparison of the scores with
    the threshold per layer, then word-wide operations on 8 entries at a time; one host read for all layers).
    Nothing is computed inside the training steps.
    The reference masks are part of its state, so a resumed run keeps counting from the original start. Under DDP the
    masks are identical on every process; under FSDP2 each process compares its own shard (the logged values are
    the main process's).

    [`regtune.MaskTuningTrainer`] adds it; add it to any other trainer's `regularizers` to get the same metrics.

    Args:
        per_layer (`bool`, defaults to `False`): also log the flipped share of every masked layer (one metric per
            layer: off by default, so that the console logs stay readable).
    """

    name = "mask_tuning"

    def __init__(self, per_layer: bool = False):
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
        counts, sizes = [], []
        for key, (layer, adapter) in self._layers.items():  # per layer: flipped entries, entries that are 1
            mask = _local(layer.masktune_scores[adapter].detach()) > layer.masktune_threshold[adapter]
            counts += [count_flips(mask, self._reference[key]), torch.count_nonzero(mask)]
            sizes.append(mask.numel())
        host = torch.stack(counts).tolist()  # one host sync, at log time
        flipped, ones = host[0::2], host[1::2]
        total = sum(sizes)
        out = {"flipped": sum(flipped) / total, "zero_fraction": (total - sum(ones)) / total}
        if self.per_layer:
            out.update({f"flipped/{key}": n / size for key, n, size in zip(self._layers, flipped, sizes)})
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
