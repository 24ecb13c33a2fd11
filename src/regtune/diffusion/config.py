"""`GARDOConfig`: the settings of [`GARDOTrainer`], validated at construction (every bad field named at once)."""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields


SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
KL_MODES = ("gated", "all", "none")
SCALES = ("auto", "batch", "group", "none")
KL_NORMALIZATIONS = ("micro_batch", "gated_count")
REFRESH_STATISTICS = ("micro_step_mean", "gated_sample_mean")
PRECISIONS = ("fp16", "bf16", "no")
SIGNS = ("proxy_overrates", "released_code")
GATE_RULES = ("nonnegative", "batch")
# fields that may differ between a checkpoint and the config that resumes it (they do not change the trajectory)
RESUMABLE_FIELDS = ("output_dir", "resume", "num_epochs", "save_every", "eval_every")


@dataclass
class GARDOConfig:
    r"""
    Configuration of [`GARDOTrainer`]: GARDO ("Reinforcing Diffusion Models without Reward Hacking",
    https://huggingface.co/papers/2512.24138) on Flow-GRPO (https://huggingface.co/papers/2505.05470).

    The defaults follow the paper's released code (github tinnerhrhe/GARDO: `config/gardo.py`, `config/base.py`,
    `scripts/train_sd3_grpo_gardo.py`, `flow_grpo/stat_tracking.py`): SDE noise level 0.7, PPO clip 1e-4,
    diversity-aware advantages `(r - mean) * w` not divided by any reward std (`scale_rewards="auto"`; without the
    diversity weights, the batch's reward std divides, Flow-GRPO's `global_std=True`), clipped at 5; samples whose
    advantage is 0 are dropped before training; two optimizer steps per epoch (the code accumulates over half of an
    epoch's sample batches and all trained timesteps); the first `int(num_inference_steps * timestep_fraction)`
    timesteps trained; KL coefficient 0.04 on the top k = 10% (adapted within [0.02, 0.2]) of the samples whose
    uncertainty is >= 0, averaged over the gated samples of each micro-batch; reference refresh when an optimizer
    step's KL (the mean over its micro-steps, 0 where nothing is gated) exceeds 3e-4, or when more than 15 epochs
    have passed since the last one; LoRA r 32 / alpha 64, lr 3e-4; fp16 mixed precision (`config/base.py`).

    Defaults that differ from the released OCR run: group size 8 (released: `num_generations=24`),
    `timestep_fraction=1.0` (released: 0.89), the paper's uncertainty sign (`uncertainty_sign="released_code"` for
    the code's), the diversity features from the trainer's `feature_fn` (released: DINOv3); not implemented:
    classifier-free guidance (released: 4.5) and an EMA of the adapter. The order in which an epoch's samples are
    split into optimizer steps differs too (by group member, not a random permutation). docs/gardo.md ("Released
    code vs regtune") lists every difference with the released line it refers to.

    The baselines are switches of the same code: `kl_mode="none"` (Flow-GRPO without KL), `kl_mode="all"`
    (Flow-GRPO's KL on every sample), each with `diversity_advantages=False` and no refresh.

    Every field is checked at construction (type, range, finiteness, allowed values); all bad fields are reported
    in one `ValueError`.
    """

    output_dir: str = field(default="gardo_out", metadata={"help": "checkpoint, metrics.jsonl and LoRA weights"})
    seed: int = field(default=0, metadata={"help": "seeds the LoRA init, prompt draws and sampling noise"})
    num_epochs: int = field(default=100, metadata={"help": "RL epochs (one rollout + optimisation each)", "ge": 1})
    prompts_per_epoch: int = field(
        default=2, metadata={"help": "prompt groups per epoch, over all processes (divisible by them)", "ge": 1}
    )
    num_generations: int = field(default=8, metadata={"help": "images per prompt (the group size)", "ge": 2})
    num_inference_steps: int = field(default=10, metadata={"help": "SDE sampling steps", "ge": 1})
    noise_level: float = field(default=0.7, metadata={"help": "the SDE's a: std = a sqrt(s/(1-s))", "gt": 0})
    timestep_fraction: float = field(
        default=1.0,
        metadata={
            "help": "train on the first int(num_inference_steps * fraction) steps (the released code's rounding "
            "down; at least one)",
            "gt": 0,
            "le": 1,
        },
    )
    optimizer_steps_per_epoch: int = field(
        default=2,
        metadata={
            "help": "optimizer steps per epoch: step s trains on members [s G/S, (s+1) G/S) of every group (the "
            "released code takes 2); from the second on, PPO's clipping can bind",
            "ge": 1,
        },
    )
    train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "micro-batch size per process; gradients of an optimizer step's micro-batches are accumulated "
            "(None: one micro-batch). With drop_zero_advantage, it fixes the number of micro-batches (ceil(step "
            "size / train_batch_size) per step) and the kept samples are split evenly among them",
            "ge": 1,
        },
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate", "gt": 0})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay", "ge": 0})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (None: off)", "gt": 0})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon", "gt": 0})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this", "gt": 0})
    scale_rewards: str = field(
        default="auto",
        metadata={
            "help": "divide the advantages by a reward std: auto (the released code: none with "
            "diversity_advantages, batch without) | batch (the batch's std, Flow-GRPO's global_std) | group (the "
            "prompt group's std) | none",
            "choices": SCALES,
        },
    )
    drop_zero_advantage: bool = field(
        default=True,
        metadata={
            "help": "drop the samples whose advantage is 0 before training, then pad the kept count up to a multiple "
            "of the number of micro-batches with randomly chosen dropped ones (the released code); False: train on "
            "every sample"
        },
    )
    diversity_advantages: bool = field(
        default=True, metadata={"help": "scale above-mean advantages by the nearest-neighbour feature distance"}
    )
    kl_mode: str = field(
        default="gated",
        metadata={"help": "gated (GARDO) | all (KL on every sample) | none (no KL)", "choices": KL_MODES},
    )
    beta: float = field(default=0.04, metadata={"help": "KL coefficient", "ge": 0})
    kl_normalization: str = field(
        default="micro_batch",
        metadata={
            "help": "micro_batch (the released code: beta * the mean KL over each micro-batch's gated samples, "
            "added to the micro-batches that hold one; accumulation divides by the number of micro-batches and "
            "timesteps) | gated_count (beta * the mean KL over all gated samples of the optimizer step, over all "
            "processes: the same weight wherever the gated samples fall)",
            "choices": KL_NORMALIZATIONS,
        },
    )
    gate_init: float = field(default=0.1, metadata={"help": "initial gated fraction k", "ge": 0, "le": 1})
    gate_min: float = field(default=0.02, metadata={"help": "lower bound of k", "ge": 0, "le": 1})
    gate_max: float = field(default=0.2, metadata={"help": "upper bound of k", "ge": 0, "le": 1})
    gate_fraction_of: str = field(
        default="nonnegative",
        metadata={
            "help": "nonnegative (the released code: the top k of the samples whose uncertainty is >= 0) | batch "
            "(round(k B) samples of the whole batch, among those with u > 0: about twice as many)",
            "choices": GATE_RULES,
        },
    )
    gate_window: int = field(default=20, metadata={"help": "epochs in k's sliding window", "ge": 1})
    adaptive_gate: bool = field(default=True, metadata={"help": "adapt k (False: keep gate_init)"})
    uncertainty_sign: str = field(
        default="proxy_overrates",
        metadata={
            "help": "proxy_overrates (the paper's intent: gate where the proxy ranks a sample above the auxiliary "
            "rewards) | released_code (the released code's opposite sign)",
            "choices": SIGNS,
        },
    )
    ref_kl_threshold: float | None = field(
        default=3e-4,
        metadata={
            "help": "refresh the reference after an epoch one of whose optimizer steps' KL exceeded this",
            "gt": 0,
        },
    )
    ref_refresh_statistic: str = field(
        default="micro_step_mean",
        metadata={
            "help": "the KL compared with ref_kl_threshold, per optimizer step: micro_step_mean (the released code: "
            "the mean over the step's micro-batches and timesteps of each one's mean gated KL, 0 where none is "
            "gated, averaged over processes) | gated_sample_mean (the mean KL per gated sample and timestep)",
            "choices": REFRESH_STATISTICS,
        },
    )
    ref_refresh_every: int | None = field(
        default=15,
        metadata={
            "help": "refresh the reference when more than N epochs passed since the last (None: never)",
            "ge": 1,
        },
    )
    ref_refresh_strict: bool = field(
        default=True,
        metadata={
            "help": "True: refresh when epoch - last > ref_refresh_every (the released code); False: when >= (every "
            "N epochs)"
        },
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank", "ge": 1})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA alpha", "gt": 0})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(SD3_LORA_TARGETS), metadata={"help": "module names that get LoRA"}
    )
    lora_init: str = field(
        default="gaussian", metadata={"help": "peft init_lora_weights", "choices": ("gaussian", "default")}
    )
    eval_every: int = field(
        default=10, metadata={"help": "evaluate every N epochs (and at the end); 0: never", "ge": 0}
    )
    eval_generations: int = field(default=8, metadata={"help": "images per held-out prompt at evaluation", "ge": 2})
    save_every: int = field(
        default=0, metadata={"help": "checkpoint every N epochs (and at the end); 0: end only", "ge": 0}
    )
    resume: bool = field(default=True, metadata={"help": "continue from output_dir/checkpoint.pt if it exists"})
    mixed_precision: str = field(
        default="fp16",
        metadata={
            "help": "the Accelerator's mixed precision: fp16 (the released configs' config/base.py) | bf16 | no. "
            "accelerate applies no fp16 autocast on CPU; an Accelerator that exists with another precision is "
            "refused",
            "choices": PRECISIONS,
        },
    )

    def __post_init__(self):
        errors = _field_errors(self)
        bad = {name for name, _ in errors}
        if not bad & {"gate_init", "gate_min", "gate_max"} and not self.gate_min <= self.gate_init <= self.gate_max:
            errors.append(
                (
                    "gate_init",
                    f"gate_init must lie in [gate_min, gate_max] = [{self.gate_min}, {self.gate_max}], "
                    f"got {self.gate_init!r}",
                )
            )
        if not bad & {"optimizer_steps_per_epoch", "num_generations"} and (
            self.optimizer_steps_per_epoch > self.num_generations
        ):
            errors.append(
                (
                    "optimizer_steps_per_epoch",
                    f"optimizer_steps_per_epoch must be <= num_generations ({self.num_generations}): every step "
                    f"trains on a share of each group, got {self.optimizer_steps_per_epoch!r}",
                )
            )
        if not bad & {"num_inference_steps", "timestep_fraction"} and self.num_train_timesteps < 1:
            errors.append(
                (
                    "timestep_fraction",
                    f"timestep_fraction must leave at least one trained timestep: int(num_inference_steps * "
                    f"timestep_fraction) = int({self.num_inference_steps} * {self.timestep_fraction}) = 0; use a "
                    f"fraction >= {1 / self.num_inference_steps:.6g}, got {self.timestep_fraction!r}",
                )
            )
        if errors:
            raise ValueError("Invalid GARDOConfig: " + "; ".join(message for _, message in errors))
        self.lora_target_modules = list(self.lora_target_modules)

    @property
    def uses_reference(self) -> bool:
        return self.kl_mode != "none" and self.beta > 0

    @property
    def num_train_timesteps(self) -> int:
        """The trained denoising steps per sample: `int(num_inference_steps * timestep_fraction)`, as the released
        code (`scripts/train_sd3_grpo_gardo.py`, `num_train_timesteps`)."""
        return int(self.num_inference_steps * self.timestep_fraction)

    @property
    def resolved_scale_rewards(self) -> str:
        """`scale_rewards` with `"auto"` resolved: `"none"` with `diversity_advantages` (the released tracker's
        `gardo` type), `"batch"` without (its `grpo` type with `global_std=True`); other values as given."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.diversity_advantages else "batch"

    def to_dict(self) -> dict:
        return asdict(self)

    def changed_fields(self, stored: dict) -> dict[str, tuple]:
        """
        `{field: (stored value, this value)}` for every field that differs from the settings `stored` (a
        `to_dict()` of another config, e.g. read from a checkpoint), except those that may change on resume
        (`output_dir`, `resume`, `num_epochs`, `save_every`, `eval_every`). A field missing from `stored` (an
        older checkpoint) counts as changed unless this config holds its default.
        """
        mine = self.to_dict()
        changed = {}
        for f in fields(self):
            if f.name in RESUMABLE_FIELDS:
                continue
            if f.name in stored:
                old = stored[f.name]
                if isinstance(old, tuple):
                    old = list(old)
                if old != mine[f.name]:
                    changed[f.name] = (old, mine[f.name])
            elif mine[f.name] != getattr(type(self)(), f.name):
                changed[f.name] = ("<absent>", mine[f.name])
        return changed


_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "True or False", str: "a string"}


def _allowed(hint, meta: dict) -> str:
    """What a field accepts, in words: `an integer >= 1`, `one of 'a', 'b'`, `a finite number > 0, or None`."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = (
        next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list else hint
    )
    if "choices" in meta:
        text = "one of " + ", ".join(repr(c) for c in meta["choices"])
    elif typing.get_origin(base) is list:
        text = "a non-empty list of module names (strings), e.g. ['to_q', 'to_k']"
    else:
        text = _TYPE_NAMES.get(base, getattr(base, "__name__", str(base)))
        bounds = [f"{sign} {meta[key]}" for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<=")) if key in meta]
        if bounds:
            text += " " + " and ".join(bounds)
    return text + (", or None" if optional else "")


def _value_ok(value, hint, meta: dict) -> bool:
    args = typing.get_args(hint)
    if value is None:
        return type(None) in args
    base = (
        next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list else hint
    )
    if typing.get_origin(base) is list:
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(v, str) and v.strip() for v in value)
        )
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif base is str:
        ok = isinstance(value, str) and bool(value)
    else:
        ok = True
    if not ok:
        return False
    if "choices" in meta and value not in meta["choices"]:
        return False
    checks = (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b))
    return all(check(value, meta[key]) for key, check in checks if key in meta) if base in (int, float) else True


def _field_errors(config) -> list[tuple[str, str]]:
    """`[(field, message)]` for every field of a config dataclass whose value its annotation and metadata refuse."""
    hints = typing.get_type_hints(type(config))
    errors = []
    for f in fields(config):
        value, meta = getattr(config, f.name), dict(f.metadata)
        if _value_ok(value, hints[f.name], meta):
            continue
        shown = repr(value)
        if isinstance(value, str) and typing.get_origin(hints[f.name]) is list:
            shown += f" (a string; write [{value!r}])"
        errors.append((f.name, f"{f.name} must be {_allowed(hints[f.name], meta)}, got {shown}"))
    return errors
