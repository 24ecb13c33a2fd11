"""`GARDOConfig`: the settings of [`GARDOTrainer`], validated in `__post_init__` (errors name the field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
KL_MODES = ("gated", "all", "none")
SCALES = ("none", "group", "batch")
SIGNS = ("proxy_overrates", "released_code")


@dataclass
class GARDOConfig:
    r"""
    Configuration of [`GARDOTrainer`]: GARDO ("Reinforcing Diffusion Models without Reward Hacking",
    https://huggingface.co/papers/2512.24138) on Flow-GRPO (https://huggingface.co/papers/2505.05470).

    The defaults are those of the paper's released code (METHODS.md §6): SDE noise level 0.7, PPO clip 1e-4,
    advantages clipped at 5 without std normalisation, KL coefficient 0.04 on the gated ~10% of samples
    (k in [0.02, 0.2]), reference refresh when the KL exceeds 3e-4 or every 15 epochs, LoRA r 32 / alpha 64,
    lr 3e-4. The baselines are switches of the same code: `kl_mode="none"` (Flow-GRPO without KL),
    `kl_mode="all"` (Flow-GRPO's KL on every sample), each with `diversity_advantages=False` and no refresh.
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
        default=1.0, metadata={"help": "train on the first ceil(fraction * steps) steps", "gt": 0, "le": 1}
    )
    train_batch_size: int | None = field(
        default=None, metadata={"help": "samples per optimizer step per process (None: all of them)", "ge": 1}
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate", "gt": 0})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay", "ge": 0})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (None: off)", "gt": 0})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon", "gt": 0})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this", "gt": 0})
    scale_rewards: str = field(
        default="none",
        metadata={"help": "advantage std normalisation: none (GARDO) | group | batch (Flow-GRPO)", "choices": SCALES},
    )
    diversity_advantages: bool = field(
        default=True, metadata={"help": "scale above-mean advantages by the nearest-neighbour feature distance"}
    )
    kl_mode: str = field(
        default="gated",
        metadata={"help": "gated (GARDO) | all (KL on every sample) | none (no KL)", "choices": KL_MODES},
    )
    beta: float = field(default=0.04, metadata={"help": "KL coefficient", "ge": 0})
    gate_init: float = field(default=0.1, metadata={"help": "initial gated fraction k", "ge": 0, "le": 1})
    gate_min: float = field(default=0.02, metadata={"help": "lower bound of k", "ge": 0, "le": 1})
    gate_max: float = field(default=0.2, metadata={"help": "upper bound of k", "ge": 0, "le": 1})
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
        default=3e-4, metadata={"help": "refresh the reference after an epoch whose KL exceeded this", "gt": 0}
    )
    ref_refresh_every: int | None = field(
        default=15, metadata={"help": "refresh the reference at least every N epochs (None: never)", "ge": 1}
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

    def __post_init__(self):
        errors = []
        for name, f in self.__dataclass_fields__.items():
            value = getattr(self, name)
            meta = f.metadata
            if "choices" in meta and value not in meta["choices"]:
                allowed = ", ".join(repr(c) for c in meta["choices"])
                errors.append(f"{name} must be one of {allowed}, got {value!r}")
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            for key, ok, sign in (
                ("ge", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("le", lambda v, b: v <= b, "<="),
            ):
                if key in meta and not ok(value, meta[key]):
                    errors.append(f"{name} must be {sign} {meta[key]}, got {value!r}")
        if not self.gate_min <= self.gate_init <= self.gate_max:
            errors.append(
                f"gate_init must lie in [gate_min, gate_max] = [{self.gate_min}, {self.gate_max}], got {self.gate_init}"
            )
        if not self.lora_target_modules:
            errors.append("lora_target_modules must name at least one module")
        if errors:
            raise ValueError("Invalid GARDOConfig: " + "; ".join(errors))

    @property
    def uses_reference(self) -> bool:
        return self.kl_mode != "none" and self.beta > 0

    def to_dict(self) -> dict:
        return asdict(self)
