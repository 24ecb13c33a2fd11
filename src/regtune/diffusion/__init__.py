"""GARDO and Flow-GRPO for diffusers flow-matching models (needs the `diffusion` extra: `pip install regtune[diffusion]`).

`import regtune` does not import this subpackage (nor diffusers); `import regtune.diffusion` does.

GARDO: "Reinforcing Diffusion Models without Reward Hacking", https://huggingface.co/papers/2512.24138.
"""

from .config import GARDOConfig
from .functional import (
    AdaptiveGateFraction,
    ReferenceRefresh,
    copy_adapter_weights,
    ddim_step_with_logprob,
    descending_ranks,
    diversity_scaled_advantages,
    gaussian_log_prob,
    gaussian_step_kl,
    group_advantages,
    masked_mean,
    nn_cosine_distance,
    ppo_clip_loss,
    rank_gap_uncertainty,
    reward_scale,
    sde_step_with_logprob,
    topk_gate,
    within_group_pairwise_l2,
)
from .trainer import GARDOTrainer


__all__ = [
    "AdaptiveGateFraction",
    "GARDOConfig",
    "GARDOTrainer",
    "ReferenceRefresh",
    "copy_adapter_weights",
    "ddim_step_with_logprob",
    "descending_ranks",
    "diversity_scaled_advantages",
    "gaussian_log_prob",
    "gaussian_step_kl",
    "group_advantages",
    "masked_mean",
    "nn_cosine_distance",
    "ppo_clip_loss",
    "rank_gap_uncertainty",
    "reward_scale",
    "sde_step_with_logprob",
    "topk_gate",
    "within_group_pairwise_l2",
]
