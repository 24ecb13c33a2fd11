"""`LfUTrainer`: trl's `SFTTrainer` with LfU's consistency regularization against undesirable updates."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from regtune.regularizers.lfu import DEFAULT_BETA, LfURegularizer, check_lfu_arguments

from .mixin import RegularizedTrainerMixin


@dataclass
class LfUConfig(SFTConfig):
    """
    `trl.SFTConfig` plus LfU's knobs ([paper](https://huggingface.co/papers/2511.13052)); see [`LfURegularizer`]
    for what each does.

    Args:
        lfu_mode (`str`, defaults to `"perturb"`):
            `"perturb"` (a normalized gradient-ascent step on the trainable parameters, the paper's LoRA mode) or
            `"reps"` (learned steering vectors after every decoder block).
        lfu_alpha (`float`, defaults to `0.1`):
            Ascent step size (perturb) or steering strength (reps).
        lfu_beta (`float`, *optional*):
            Consistency weight. Defaults to 5.0 for perturb and 0.1 for reps (the paper's run scripts).
        lfu_start_layer (`int`, defaults to `0`) and lfu_end_layer (`int`, *optional*):
            The hidden states compared, as a slice `[start, end)` of `(embeddings, block 1, ..., block L)`; the
            default compares all of them, as the paper does.
        lfu_second_batch (`str`, defaults to `"train"`):
            Where the batch `x'` of the ascent step comes from: `"train"` (another batch of the train set),
            `"dataset"` (the `lfu_dataset` given to [`LfUTrainer`]) or `"same"` (`x' = x`, which reuses the task
            gradient: 2 forwards + 2 backwards instead of 3 + 3).
        lfu_reps_lr_weight (`float`, defaults to `1.0`):
            Learning rate of the steering vectors' Adam, as a multiple of `learning_rate` (reps mode).
    """

    lfu_mode: str = field(default="perturb", metadata={"help": "LfU mode: 'perturb' or 'reps'."})
    lfu_alpha: float = field(default=0.1, metadata={"help": "Ascent step (perturb) or steering strength (reps)."})
    lfu_beta: float | None = field(
        default=None, metadata={"help": "Consistency weight; default 5.0 (perturb) or 0.1 (reps)."}
    )
    lfu_start_layer: int = field(default=0, metadata={"help": "First hidden state compared (0 = embeddings)."})
    lfu_end_layer: int | None = field(
        default=None, metadata={"help": "End (exclusive) of the hidden states compared; default: all."}
    )
    lfu_second_batch: str = field(
        default="train", metadata={"help": "Source of the ascent batch x': 'train', 'dataset' or 'same'."}
    )
    lfu_reps_lr_weight: float = field(
        default=1.0, metadata={"help": "Steering vectors' learning rate as a multiple of learning_rate (reps)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_lfu_arguments(
            self.lfu_mode,
            self.lfu_alpha,
            self.lfu_beta,
            self.lfu_start_layer,
            self.lfu_end_layer,
            self.lfu_second_batch,
            self.lfu_reps_lr_weight,
            prefix="lfu_",
        )

    @property
    def lfu_effective_beta(self) -> float:
        """`lfu_beta`, or the mode's default when it is unset."""
        return DEFAULT_BETA[self.lfu_mode] if self.lfu_beta is None else self.lfu_beta


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
        *args, **kwargs: `SFTTrainer`'s (`args` must be an [`LfUConfig`]; a plain `SFTConfig` gets LfU's defaults).
    """

    config_class = LfUConfig

    def __init__(
        self, model=None, args: SFTConfig | None = None, *pargs, lfu_dataset=None, regularizers=None, **kwargs
    ):
        if args is not None and not isinstance(args, LfUConfig):
            raise TypeError(f"LfUTrainer takes an LfUConfig as `args`, got {type(args).__name__}.")
        self._lfu_raw_dataset = lfu_dataset
        lfu = self._build_lfu(args)
        super().__init__(model, args, *pargs, regularizers=[lfu, *(regularizers or [])], **kwargs)
        if lfu_dataset is not None:
            lfu.second_dataset = self._prepare_dataset(
                lfu_dataset, self.processing_class, self.args, self.args.packing, None, "lfu"
            )

    def _build_lfu(self, args: LfUConfig | None) -> LfURegularizer:
        args = args if args is not None else LfUConfig("trainer_output")
        if args.lfu_second_batch == "dataset" and self._lfu_raw_dataset is None:
            raise ValueError('`lfu_second_batch="dataset"` needs `lfu_dataset=` passed to LfUTrainer.')
        return LfURegularizer(
            mode=args.lfu_mode,
            alpha=args.lfu_alpha,
            beta=args.lfu_beta,
            start_layer=args.lfu_start_layer,
            end_layer=args.lfu_end_layer,
            second_batch=args.lfu_second_batch,
            second_dataset=self._lfu_raw_dataset,  # replaced by its prepared form once the trainer is built
            reps_lr_weight=args.lfu_reps_lr_weight,
        )
