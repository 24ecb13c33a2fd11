"""Multi-sample dropout (Inoue 2019, https://arxiv.org/abs/1905.09788)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from regtune.functional._checks import is_int, is_rate, raise_field_errors

from .base import Regularizer


_HEAD_CANDIDATES = ("classifier", "score")
_LATE_HEAD_CANDIDATES = ("head", "fc")


def _repeat_batch(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """`[t; t; ...; t]` along dim 0 (sample k of row b is row `k * B + b`)."""
    return tensor.repeat(times, *([1] * (tensor.dim() - 1)))


@dataclass
class _FoldRun:
    """What happened during one training `compute_loss` (one micro-batch)."""

    in_forward: bool = False
    grad_forwards: int = 0
    folds: int = 0
    batch: int | None = None
    labels_in_model: bool = False
    consumed_by_trainer: bool = False


class MultiSampleDropout(Regularizer):
    """
    Multi-sample dropout (Inoue 2019, "Multi-Sample Dropout for Accelerated Training and Better Generalization",
    https://arxiv.org/abs/1905.09788): draw `num_samples` (K) dropout masks of the head input `h`, pass each through
    the shared head, and average the K *losses* (not the logits):

        L = (1/K) sum_k loss(head(dropout_k(h)), y)

    The backbone runs once; only the head runs K times. At evaluation dropout is off, the K copies are identical, and
    the model is left untouched.

    How it changes the forward (see [`Regularizer.forward_context`]): during a training `compute_loss` only, it

    1. sets the model's own dropout right before the head (`head_dropout`, e.g. BERT's `self.dropout(pooled_output)`)
       to p=0, so the head input `h` is the clean feature,
    2. replaces the head input by the K dropout samples stacked along the batch dimension (`(B, ...)` -> `(K*B, ...)`,
       one batched head call) with a forward pre-hook on the head,
    3. repeats `labels` (and `shift_labels`) K times and multiplies `num_items_in_batch` by K on their way into the
       model (a forward pre-hook on the transformers model), so **the model's own loss** -- whatever it is:
       cross-entropy, BCE for multi-label, MSE for regression, token-level causal-LM loss with the Trainer's
       `num_items_in_batch` normalization -- is exactly the mean of the K per-sample losses, and the Trainer's
       gradient-accumulation and DDP scaling rules apply unchanged;
    4. cuts `outputs.logits` back to the first sample (`B` rows) after the forward, so callers see ordinary outputs.

    When the Trainer keeps the labels from the model (`label_smoothing_factor > 0`, `compute_loss_func`), the label
    smoother / loss function is wrapped the same way instead. The dropout masks come from the global torch RNG, which
    the Trainer checkpoints (so there is no state of its own) and which differs per DDP process, as for any dropout.

    Limits: the head output must be what the loss reads. Models that transform it first (decoder
    `*ForSequenceClassification` models pool the last token *after* the head; trl's fused LM head never calls
    `lm_head`) fail with an error that says so. For causal-LM heads, the K head passes cost K x the `lm_head` matmul
    and K x the logits memory.

    Args:
        num_samples (`int`, defaults to `8`): K, the number of dropout samples (>= 1; 1 is ordinary dropout). Gains
            are reported to level off around 8.
        p (`float`, *optional*): the dropout probability of each sample, in [0, 1). Defaults to the current `p` of
            the model's dropout before the head, read at every step (so a [`DropoutSchedule`] also schedules it);
            required when the model has none (e.g. Llama, ViT classifiers).
        head (`str`, *optional*): the module path of the head inside the transformers model (e.g. `"classifier"`,
            `"classifier.out_proj"`, `"lm_head"`). Default: `classifier` (its `out_proj` for RoBERTa-style heads),
            `score`, the output embeddings (`lm_head`), `head`, `fc`, whichever exists first.
        head_dropout (`str`, *optional*, defaults to `"auto"`): the module path of the dropout applied right before
            the head, replaced by the K samples. `"auto"`: a `dropout` module next to the head (BERT, DistilBERT,
            RoBERTa's classification head), if any. `None`: do not disable any model dropout (the K masks then
            stack on top of it).
    """

    name = "multi_sample_dropout"

    def __init__(
        self,
        num_samples: int = 8,
        p: float | None = None,
        head: str | None = None,
        head_dropout: str | None = "auto",
    ):
        errors = []
        if not is_int(num_samples) or num_samples < 1:
            errors.append(f"`num_samples` must be an integer >= 1, got {num_samples!r}")
        if p is not None and not is_rate(p, upper_inclusive=False):
            errors.append(f"`p` must be None or a number in [0, 1), got {p!r}")
        if head is not None and (not isinstance(head, str) or not head):
            errors.append(f"`head` must be None or a module path (a non-empty string), got {head!r}")
        if head_dropout is not None and (not isinstance(head_dropout, str) or not head_dropout):
            errors.append(f"`head_dropout` must be 'auto', None or a module path, got {head_dropout!r}")
        raise_field_errors("MultiSampleDropout", errors)
        self.num_samples = int(num_samples)
        self.p = None if p is None else float(p)
        self.head = head
        self.head_dropout = head_dropout
        self._resolved: tuple[int, nn.Module, str, nn.Module, str | None, nn.Module | None] | None = None

    # ---- model introspection ----

    @staticmethod
    def _base_model(model: nn.Module) -> nn.Module:
        """The transformers model under DDP / torch.compile / peft wrappers: the module that owns head and loss."""
        model = extract_model_from_parallel(model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def _find_head(self, base: nn.Module) -> str:
        if self.head is not None:
            try:
                base.get_submodule(self.head)
            except AttributeError as err:
                raise ValueError(
                    f"MultiSampleDropout: `head`={self.head!r} is not a module of {type(base).__name__}."
                ) from err
            return self.head
        for name in _HEAD_CANDIDATES:
            module = getattr(base, name, None)
            if isinstance(module, nn.Module):
                if isinstance(getattr(module, "out_proj", None), nn.Module):
                    return f"{name}.out_proj"
                return name
        output_embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if output_embeddings is not None:
            for name, module in base.named_modules():
                if module is output_embeddings:
                    return name
        for name in _LATE_HEAD_CANDIDATES:
            if isinstance(getattr(base, name, None), nn.Module):
                return name
        raise ValueError(
            f"MultiSampleDropout: could not find the head of {type(base).__name__} (tried "
            f"{list(_HEAD_CANDIDATES) + ['get_output_embeddings()'] + list(_LATE_HEAD_CANDIDATES)}); pass `head=`."
        )

    def _find_head_dropout(self, base: nn.Module, head_name: str) -> tuple[str | None, nn.Module | None]:
        if self.head_dropout is None:
            return None, None
        if self.head_dropout == "auto":
            parent_name = head_name.rpartition(".")[0]
            parent = base.get_submodule(parent_name) if parent_name else base
            module = getattr(parent, "dropout", None)
            if isinstance(module, nn.modules.dropout._DropoutNd):
                return (f"{parent_name}.dropout" if parent_name else "dropout"), module
            return None, None
        try:
            module = base.get_submodule(self.head_dropout)
        except AttributeError as err:
            raise ValueError(
                f"MultiSampleDropout: `head_dropout`={self.head_dropout!r} is not a module of {type(base).__name__}."
            ) from err
        if not isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"MultiSampleDropout: `head_dropout`={self.head_dropout!r} is a {type(module).__name__}, not a dropout "
                "module."
            )
        return self.head_dropout, module

    def resolve(self, model: nn.Module) -> tuple[nn.Module, str, nn.Module, str | None, nn.Module | None]:
        """Return `(base_model, head_name, head, head_dropout_name, head_dropout)` for `model` (cached)."""
        base = self._base_model(model)
        if self._resolved is None or self._resolved[0] != id(base):
            head_name = self._find_head(base)
            dropout_name, dropout = self._find_head_dropout(base, head_name)
            if self.p is None and dropout is None:
                raise ValueError(
                    f"MultiSampleDropout: `p` is None but {type(base).__name__} has no dropout module right before its "
                    f"head `{head_name}` to take the rate from; pass `p=` (e.g. 0.1)."
                )
            self._resolved = (id(base), base, head_name, base.get_submodule(head_name), dropout_name, dropout)
        return self._resolved[1:]

    # ---- hooks ----

    def setup(self, trainer) -> None:
        self._resolved = None
        self.resolve(trainer.model)  # fail at train start, not at the first step

    def forward_context(self, trainer, model: nn.Module, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        return self._fold(trainer, model)

    @contextlib.contextmanager
    def _fold(self, trainer, model: nn.Module):
        base, head_name, head, dropout_name, dropout = self.resolve(model)
        p = self.p if self.p is not None else float(dropout.p)
        k = self.num_samples
        if k == 1 or p == 0.0:
            yield  # all samples would be identical: this is the plain forward
            return
        run = _FoldRun()

        def base_pre_hook(module, args, kwargs):
            run.in_forward = torch.is_grad_enabled()
            if not run.in_forward:
                return None  # metric / reference forwards under no_grad are left alone
            if kwargs.get("fused_lm_head"):
                raise ValueError(
                    "multi_sample_dropout needs the head output, but trl's fused LM head (SFTTrainer's default loss) "
                    "never calls the head. Use it with classification heads, with `compute_loss_func`, or with a "
                    "plain transformers Trainer."
                )
            run.grad_forwards += 1
            kwargs = dict(kwargs)
            for key in ("labels", "shift_labels"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = _repeat_batch(kwargs[key], k)
                    run.labels_in_model = True
            if kwargs.get("num_items_in_batch") is not None and run.labels_in_model:
                kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"] * k
            return args, kwargs

        def base_post_hook(module, args, kwargs, output):
            if run.in_forward and run.labels_in_model and run.batch is not None:
                _cut_logits(output, run.batch, k)
            run.in_forward = False
            return output

        def head_pre_hook(module, args):
            if not run.in_forward:
                return None
            x = args[0]
            if run.batch is None:
                run.batch = x.shape[0]
            run.folds += 1
            return (F.dropout(_repeat_batch(x, k), p, training=True), *args[1:])

        def wrap_trainer_loss(fn):
            def wrapped(outputs, labels, *args, **kwargs):
                logits = outputs.get("logits") if isinstance(outputs, dict) else None
                if (
                    labels is None
                    or run.labels_in_model
                    or run.batch is None
                    or logits is None
                    or logits.shape[0] != k * run.batch
                ):
                    return fn(outputs, labels, *args, **kwargs)
                if kwargs.get("num_items_in_batch") is not None:
                    kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"] * k
                loss = fn(outputs, _repeat_batch(labels, k), *args, **kwargs)
                run.consumed_by_trainer = True
                _cut_logits(outputs, run.batch, k)
                return loss

            return wrapped

        handles = [
            base.register_forward_pre_hook(base_pre_hook, with_kwargs=True),
            base.register_forward_hook(base_post_hook, with_kwargs=True),
            head.register_forward_pre_hook(head_pre_hook),
        ]
        saved_p = None
        if dropout is not None:
            saved_p, dropout.p = dropout.p, 0.0
        swapped = []
        for attr in ("label_smoother", "compute_loss_func"):
            fn = getattr(trainer, attr, None) if trainer is not None else None
            if fn is not None:
                swapped.append((attr, fn))
                setattr(trainer, attr, wrap_trainer_loss(fn))
        try:
            try:
                yield
            except Exception as err:
                if run.grad_forwards and hasattr(err, "add_note"):
                    if run.folds:
                        err.add_note(
                            f"multi_sample_dropout stacked {k} dropout samples of the input of head `{head_name}` "
                            f"along the batch dimension ({run.batch} -> {k * run.batch} rows) and repeated the labels "
                            f"{k} times. Models that transform the head output before the loss (e.g. decoder "
                            "*ForSequenceClassification models pool the last token after the head) are not supported."
                        )
                    elif run.labels_in_model:
                        err.add_note(
                            f"multi_sample_dropout repeated the labels {k} times for the head `{head_name}`, but "
                            f"{type(base).__name__} did not call that head before this error; pass the module that "
                            "produces the logits as `head=`."
                        )
                raise
            if run.grad_forwards and not run.folds:
                raise RuntimeError(
                    f"multi_sample_dropout: the head `{head_name}` of {type(base).__name__} was not called during the "
                    "training forward; pass the module that produces the logits as `head=`."
                )
            if run.folds and not (run.labels_in_model or run.consumed_by_trainer):
                raise RuntimeError(
                    "multi_sample_dropout: the training loss was not computed from the head samples: the model got no "
                    "`labels`, and neither the Trainer's label smoother nor its `compute_loss_func` took the "
                    "outputs. Custom `compute_loss` overrides that compute the loss from `outputs.logits` are not "
                    "supported."
                )
        finally:
            for handle in handles:
                handle.remove()
            if dropout is not None:
                dropout.p = saved_p
            for attr, fn in swapped:
                setattr(trainer, attr, fn)

    def __repr__(self) -> str:
        return f"MultiSampleDropout(num_samples={self.num_samples}, p={self.p}, head={self.head!r})"


def _cut_logits(output: Any, batch: int, k: int) -> None:
    """Keep the first dropout sample of `output.logits` (in place), so callers see `B` rows."""
    if isinstance(output, dict):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor) and logits.shape[0] == k * batch:
            output["logits"] = logits[:batch]
