"""`LfUTrainer`: trl's `SFTTrainer` with LfU's consistency regularization against undesirable updates."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig, SFTTrainer

from regtune.functional._checks import raise_field_errors
from regtune.regularizers import Regularizer
from regtune.regularizers.lfu import DEFAULT_BETA, SETTINGS_FIELDS, LfURegularizer, LfUSettings, settings_field

from .mixin import RegularizedTrainerMixin


logger = logging.getLogger(__name__)


def _bf16_trainable() -> bool:
    """Whether transformers accepts `bf16=True` without `use_cpu`: a bf16-capable accelerator (or XLA) is present."""
    return is_torch_bf16_gpu_available() or is_torch_xla_available()


@dataclass
class LfUConfig(SFTConfig):
    """
    `trl.SFTConfig` plus LfU's knobs ([paper](https://huggingface.co/papers/2511.13052)), as `lfu_<name>` for each
    field of [`LfUSettings`]; docs/lfu.md describes what each does. All of them are validated when the config is
    built, and every bad one is reported in one `ValueError`.

    Args:
        lfu_mode (`str`, defaults to `"perturb"`):
            `"perturb"` (a normalized gradient-ascent step on the trainable parameters, the paper's LoRA mode) or
            `"reps"` (learned steering vectors, one per decoder block).
        lfu_alpha (`float`, defaults to `0.1`):
            Ascent step size (perturb) or steering strength (reps); a finite number > 0.
        lfu_beta (`float`, *optional*):
            Consistency weight, a finite number >= 0. Defaults to 5.0 for perturb and 0.1 for reps (the paper's run
            scripts).
        lfu_start_layer (`int`, defaults to `0`) and lfu_end_layer (`int`, *optional*):
            The hidden states compared, as a slice `[start, end)` of `(embeddings, block 1, ..., block L)`; the
            default compares all of them, as the paper does.
        lfu_second_batch (`str`, defaults to `"train"`):
            Where the batch `x'` of the ascent step comes from: `"train"` (another batch of the train set),
            `"dataset"` (the `lfu_dataset` given to [`LfUTrainer`]) or `"same"` (`x' = x`, which reuses the task
            gradient: 2 forwards + 2 backwards instead of 3 + 3).
        lfu_reps_lr_weight (`float`, defaults to `1.0`):
            Learning rate of the steering vectors' Adam, as a multiple of `learning_rate` (reps mode).
        lfu_reps_site (`str`, defaults to `"mlp"`):
            Where a steering vector acts (reps mode): `"mlp"`, the output of each block's MLP (the released code's
            site), or `"block"`, the output of each decoder block.
        lfu_reps_pairing (`str`, defaults to `"released"`):
            Which hidden states the consistency compares in reps mode: `"released"` (the released trainer's pairing:
            the clean states of the batch, with gradient, against the steered states of the ascent batch `x'`,
            detached; with a different length, the last position of each row of `x'` stands for the whole row) or
            `"steered_x"` (the steered states of the batch, with gradient, against its clean states, detached: perturb
            mode's pairing).
        lfu_reps_vector_grad (`str`, defaults to `"last"`):
            The steering vectors' gradient over the micro-batches of an optimizer step (reps mode): `"last"` (each
            micro-batch replaces it, so Adam steps on the last one's, as the released code) or `"accumulate"` (the
            mean over the micro-batches). The same with `gradient_accumulation_steps=1`.
        lfu_reps_vector_dtype (`str`, defaults to `"hidden"`):
            The steering vectors' dtype (reps mode): `"hidden"` (the hidden states' dtype, as the released code:
            bf16 for a model loaded in bf16, where most of Adam's steps round away) or `"float32"`.
        lfu_share_dropout_masks (`bool`, defaults to `True`):
            Whether the perturbed (steered) forward of a batch draws the clean forward's dropout masks, so that the
            consistency term measures the undesirable update and not dropout noise. `False` draws fresh masks.
        lfu_log_diagnostics (`bool`, defaults to `True`):
            Log LfU's diagnostics with the training loss: `lfu/consistency`, `lfu/cons_to_sft` (`beta * L_cons /
            L_sft`), `lfu/ascent_gain` (relative raise of the `x'` loss by the undesirable update; measured within a
            2% compute budget), `lfu/steered_loss` (reps).
        bf16 (`bool`, *optional*):
            As in `trl.SFTConfig` (on unless `fp16` is set), except where trl's default cannot run: on a machine
            without a bf16-capable accelerator and without `use_cpu=True` (e.g. a CPU-only machine), where trl's
            default raises, an unset `bf16` means fp32 training. An explicit `bf16=True` is passed through unchanged.
    """

    lfu_mode: str = settings_field("mode")
    lfu_alpha: float = settings_field("alpha")
    lfu_beta: float | None = settings_field("beta")
    lfu_start_layer: int = settings_field("start_layer")
    lfu_end_layer: int | None = settings_field("end_layer")
    lfu_second_batch: str = settings_field("second_batch")
    lfu_reps_lr_weight: float = settings_field("reps_lr_weight")
    lfu_reps_site: str = settings_field("reps_site")
    lfu_reps_pairing: str = settings_field("reps_pairing")
    lfu_reps_vector_grad: str = settings_field("reps_vector_grad")
    lfu_reps_vector_dtype: str = settings_field("reps_vector_dtype")
    lfu_share_dropout_masks: bool = settings_field("share_dropout_masks")
    lfu_log_diagnostics: bool = settings_field("log_diagnostics")

    def __post_init__(self):
        # LfU's fields first, all at once, so that a bad one is not hidden behind an error of the host's fields
        raise_field_errors("LfUConfig", LfUSettings.field_errors(self._lfu_values(), prefix="lfu_"))
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _bf16_trainable():
            logger.info("LfUConfig: no bf16-capable accelerator found, so `bf16` (unset) defaults to False (fp32).")
            self.bf16 = False
        super().__post_init__()

    def _lfu_values(self) -> dict:
        return {name: getattr(self, f"lfu_{name}") for name in SETTINGS_FIELDS}

    @property
    def lfu_settings(self) -> LfUSettings:
        """The `lfu_*` fields as one validated [`LfUSettings`]."""
        return LfUSettings(**self._lfu_values())

    @property
    def lfu_effective_beta(self) -> float:
        """`lfu_beta`, or the mode's default when it is unset."""
        return DEFAULT_BETA[self.lfu_mode] if self.lfu_beta is None else self.lfu_beta


def _first_row(dataset) -> dict | None:
    """The first row of a `datasets.Dataset` / `IterableDataset` (or of any indexable / iterable of dicts), else None."""
    try:
        row = dataset[0] if hasattr(dataset, "__getitem__") and not isinstance(dataset, dict) else next(iter(dataset))
    except (IndexError, KeyError, StopIteration, TypeError):
        return None
    return row if isinstance(row, dict) else None


def _warn_if_prompt_tokens_in_mask(args: LfUConfig, train_dataset) -> None:
    """
    Log a warning when the consistency mask (the tokens whose label is not -100) will hold the prompt tokens of a
    conversational data set: `messages` rows without `assistant_only_loss=True`, or prompt/completion rows with
    `completion_only_loss=False`. The released code masks the prompt (its labels are -100), so LfU then also
    regularizes the hidden states of the system and user turns. Raw (untokenized) rows only; nothing is checked on a
    tokenized data set.
    """
    from trl.data_utils import is_conversational

    row = _first_row(train_dataset) if train_dataset is not None else None
    if row is None or "input_ids" in row or not is_conversational(row):
        return
    if "messages" in row and not args.assistant_only_loss:
        fix = "set `assistant_only_loss=True` (the chat template needs `{% generation %}` markers, or one trl can "
        fix += "swap in) or pass the data set as conversational prompt/completion rows"
        what = "`messages` data set with `assistant_only_loss=False`"
    elif "prompt" in row and "completion" in row and args.completion_only_loss is False:
        fix, what = "leave `completion_only_loss` unset (True for prompt/completion rows)", "prompt/completion data"
        what += " set with `completion_only_loss=False`"
    else:
        return
    logger.warning(
        "LfUTrainer: the consistency mask (tokens whose label is not -100) will hold the prompt tokens (system and "
        "user turns) of this conversational %s, so LfU also regularizes their hidden states; the released code masks "
        "the prompt. To compare the response tokens only, %s.",
        what,
        fix,
    )


class LfUTrainer(RegularizedTrainerMixin, SFTTrainer):
    """
    A `trl.SFTTrainer` that trains with LfU ([paper](https://huggingface.co/papers/2511.13052)): the SFT loss plus
    `beta` x the consistency of the hidden states under an undesirable update (see [`LfURegularizer`] for the exact
    step, its cost and its semantics under gradient accumulation, DDP and resume). Everything else -- dataset formats
    (language modeling, prompt/completion, conversational `messages`), packing, completion-only loss, PEFT -- is
    SFTTrainer's. Other, non-step-owning regularizers can be added with `regularizers=[...]`.

    Example:

        ```py
        >>> from peft import LoraConfig
        >>> trainer = regtune.LfUTrainer(
        ...     model=model,
        ...     args=regtune.LfUConfig("out", lfu_mode="perturb", lfu_alpha=0.1, lfu_beta=5.0),
        ...     train_dataset=dataset,  # e.g. {"prompt": [...], "completion": [...]}
        ...     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        ... )
        >>> trainer.train()
        ```

    Args:
        lfu_dataset (`datasets.Dataset`, *optional*):
            The data set the ascent batch is drawn from when `args.lfu_second_batch == "dataset"`, in any format
            SFTTrainer takes; it is prepared (tokenized) like the train set.
        *args, **kwargs: `SFTTrainer`'s (`args` must be an [`LfUConfig`]; `None` takes its defaults, with the
            output directory `<model name>-LfU`).
    """

    config_class = LfUConfig

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module | None = None,
        args: LfUConfig | None = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
        *,
        lfu_dataset: Any = None,
        regularizers: Iterable[Regularizer] | None = None,
        on_nonfinite: str = "error",
    ):
        if args is not None and not isinstance(args, LfUConfig):
            raise TypeError(f"LfUTrainer takes an LfUConfig as `args`, got {type(args).__name__}.")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = LfUConfig(f"{(name or 'model').rstrip('/').split('/')[-1]}-LfU")
        self._lfu_raw_dataset = lfu_dataset
        _warn_if_prompt_tokens_in_mask(args, train_dataset)
        lfu = self._build_lfu(args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
            regularizers=[lfu, *(regularizers or [])],
            on_nonfinite=on_nonfinite,
        )
        if lfu_dataset is not None:
            lfu.second_dataset = self._prepare_dataset(
                lfu_dataset, self.processing_class, self.args, self.args.packing, None, "lfu"
            )

    def _build_lfu(self, args: LfUConfig) -> LfURegularizer:
        if args.lfu_second_batch == "dataset" and self._lfu_raw_dataset is None:
            raise ValueError('`lfu_second_batch="dataset"` needs `lfu_dataset=` passed to LfUTrainer.')
        return LfURegularizer(
            settings=args.lfu_settings,
            second_dataset=self._lfu_raw_dataset,  # replaced by its prepared form once the trainer is built
        )
