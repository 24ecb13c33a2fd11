"""GARDO's and Flow-GRPO's math as pure torch functions (layer 1: no peft, diffusers or Trainer imports).

* Flow-GRPO, "Flow-GRPO: Training Flow Matching Models via Online RL", https://huggingface.co/papers/2505.05470:
  the SDE step with log-probability of a flow-matching (rectified-flow) sampler, group advantages, PPO-clip loss.
* DDPO, "Training Diffusion Models with Reinforcement Learning", https://huggingface.co/papers/2305.13301: the
  DDIM step with `eta > 0` and its log-probability for epsilon-prediction models.
* GARDO, "Reinforcing Diffusion Models without Reward Hacking", https://huggingface.co/papers/2512.24138: the
  per-step Gaussian KL applied to gated samples only, the uncertainty gate (rank disagreement between the proxy
  reward and auxiliary rewards, adaptive gated fraction), reference refresh, diversity-aware advantages.

Conventions: the sample dimension is the first one; log-probabilities and KLs are *means over the non-batch
dimensions* (Flow-GRPO and DDPO do the same), computed in float32. No function synchronises with the host.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from regtune._sharding import foreach_copy_


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
SCALES = ("group", "batch", "none")


def _batch_vector(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a `[B]` tensor against `like` (`[B, ...]`)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0 or value.ndim == like.ndim:
        return value
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Log-density of `x` under `N(mean, std^2)` elementwise, averaged over the non-batch dimensions: `[B]`."""
    x, mean = x.float(), mean.float()
    std = _per_sample(std, x)
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return _mean_dims(logp)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling steps with log-probability


def _next_sample(mean, std, prev_sample=None, generator=None, noise=None) -> torch.Tensor:
    """`prev_sample` (float32) if given, else `mean + std * noise`, with `noise` drawn from `generator` if not given."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    return prev_sample.float()


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    *,
    sigma_max_clamp: float | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    One step of Flow-GRPO's SDE sampler for a flow-matching model (the ODE step `x + dt v` plus matched noise).

    With `s = sigma`, `s' = sigma_next`, `dt = s' - s < 0` and `a = noise_level`:

        std  = a * sqrt(s / (1 - s))
        mean = x * (1 + std^2 dt / (2 s)) + v * (1 + std^2 (1 - s) / (2 s)) * dt
        x'   = mean + std * sqrt(-dt) * eps
        logp = mean over dims of log N(x'; mean, (std sqrt(-dt))^2)

    At `s = 1` the released code replaces `1 - s` by `1 - sigmas[1]` (pass that as `sigma_max_clamp`); otherwise
    `1 - s` is clamped away from 0. `noise_level = 0` gives the deterministic Euler (ODE) step, whose log-probability
    is not defined (it is returned as zeros).

    Args:
        velocity: the model's velocity prediction `v` at `(sample, sigma)`, `[B, ...]`.
        sample: the current latent `x`, `[B, ...]`.
        sigma, sigma_next: current and next noise level, scalars or `[B]` tensors (`sigma_next < sigma`).
        noise_level: the SDE's `a` (0.7 in Flow-GRPO and GARDO).
        sigma_max_clamp: the value of `1 - s` to use where `s == 1` (Flow-GRPO: `1 - sigmas[1]`).
        prev_sample: if given, the log-probability of this `x'` is returned instead of drawing a new one.
        generator: random generator for the noise.
        noise: the standard normal noise `eps` to use (instead of drawing it).

    The arguments after `noise_level` are keyword-only.

    Returns:
        `(prev_sample, log_prob [B], mean, std [B])` where `std` is the step's `a sqrt(s / (1 - s))` (without the
        `sqrt(-dt)` factor, the convention of the released code's KL).
    """
    v, x = velocity.float(), sample.float()
    s = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=x.device), x)
    s_next = _per_sample(torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device), x)
    dt = s_next - s
    one_minus = 1 - s
    if sigma_max_clamp is not None:
        one_minus = torch.where(s >= 1, torch.full_like(one_minus, sigma_max_clamp), one_minus)
    one_minus = one_minus.clamp_min(1e-6)
    std = noise_level * torch.sqrt(s / one_minus)
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    step_std = std * torch.sqrt(-dt)
    prev_sample = _next_sample(mean, step_std, prev_sample, generator, noise)
    if noise_level > 0:
        log_prob = gaussian_log_prob(prev_sample, mean, step_std)
    else:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    return prev_sample, log_prob, mean, _batch_vector(std, x.shape[0])


def ddim_step_with_logprob(
    eps_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    alpha_prod_t_prev: torch.Tensor | float,
    eta: float,
    *,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    One DDIM step with `eta > 0` and its log-probability (DDPO's `ddim_step_with_logprob`, DDIM eq. 12).

        x0    = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
        var   = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std   = eta * sqrt(var)
        mean  = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps
        x'    = mean + std * noise;   logp = mean over dims of log N(x'; mean, std^2)

    `alpha_prod_t*` are the cumulative products of the scheduler's alphas (`DDIMScheduler.alphas_cumprod[t]`;
    `final_alpha_cumprod` at the last step). `eta` (> 0) has no default (DDPO uses 1.0); the arguments after it are
    keyword-only. Returns `(prev_sample, log_prob [B], mean, std [B])`.
    """
    eps, x = eps_pred.float(), sample.float()
    a_t = _per_sample(torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=x.device), x)
    a_prev = _per_sample(torch.as_tensor(alpha_prod_t_prev, dtype=torch.float32, device=x.device), x)
    x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * torch.sqrt(variance)
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - std**2).clamp_min(0)) * eps
    prev_sample = _next_sample(mean, std, prev_sample, generator)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, _batch_vector(std, x.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and losses


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, (int(inverse.max()) + 1 if inverse.numel() else 0)


def _group_mean(values: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    z = torch.zeros(n_groups, device=values.device)
    counts = z.index_add(0, inverse, torch.ones_like(values))
    return (z.index_add(0, inverse, values) / counts)[inverse]


def _centered(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """`r_i - mean_{group(i)} r` in float32."""
    rewards = rewards.float()
    inverse, n_groups = _group_index(group_ids)
    return rewards - _group_mean(rewards, inverse, n_groups)


def reward_scale(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale: str = "batch",
    *,
    batch_rewards: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """
    The per-sample divisor of the advantages (for [`GARDOConfig`]'s `scale_rewards="auto"`, resolve it first with
    `GARDOConfig.resolved_scale_rewards`; trl GRPO's `scale_rewards` names; population stds, as Flow-GRPO's
    `PerPromptStatTracker`): `1` (`"none"`), the group's std + eps (`"group"`), or the batch's std + eps (`"batch"`,
    Flow-GRPO's `global_std=True`). `batch_rewards`: the rewards whose std `"batch"` uses (default `rewards`; under
    DDP pass the gathered global batch). `[B]`. The arguments after `scale` are keyword-only.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(repr(s) for s in SCALES)}, got {scale!r}")
    rewards = rewards.float()
    if scale == "none":
        return torch.ones_like(rewards)
    if scale == "batch":
        pool = rewards if batch_rewards is None else batch_rewards.float()
        return (pool.std(unbiased=False) + eps).expand_as(rewards)
    inverse, n_groups = _group_index(group_ids)
    return _group_mean(_centered(rewards, group_ids) ** 2, inverse, n_groups).sqrt() + eps


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale: str = "batch",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Per-prompt group advantages `A_i = (r_i - mean_{group(i)} r) / s_i` (Flow-GRPO).

    `scale`: `"batch"` (Flow-GRPO's `global_std=True`, the released configs' setting: `s` = the std of all rewards of
    the batch), `"group"` (GRPO: the group's std) or `"none"` (`s = 1`); see [`reward_scale`].
    """
    return _centered(rewards, group_ids) / reward_scale(
        rewards, group_ids, scale, batch_rewards=batch_rewards, eps=eps
    )


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """
    PPO-clip policy loss per sample for one denoising step: `max(-A r, -A clip(r, 1 - eps, 1 + eps))`,
    `r = exp(logp - logp_old)`. Returns `[B]` (average it yourself).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def gaussian_step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """
    KL between the policy's and the reference's Gaussian step with the same std, per sample:
    `mean over dims (mu - mu_ref)^2 / (2 std^2)`, `[B]`.
    """
    mean, ref_mean = mean.float(), ref_mean.float()
    std = _per_sample(std, mean)
    return _mean_dims((mean - ref_mean) ** 2 / (2 * std**2))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, count: torch.Tensor | None = None):
    """
    `sum(values * mask) / count`, with `count = max(sum(mask), 1)` by default (a mean over the masked samples; 0 when
    none is masked). `mask=None` is the plain mean. Pass `count` to normalise by a global number of masked samples
    (under DDP).
    """
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    if count is None:
        count = mask.sum().clamp_min(1)
    return (values * mask).sum() / count


# ---------------------------------------------------------------------------------------------------------------------
# The uncertainty gate


def descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value in descending order, best = 1 (ties broken by position), as float: `[B]`."""
    order = torch.argsort(values, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, values.numel() + 1, device=values.device)
    return ranks.float()


def rank_gap_uncertainty(
    proxy: torch.Tensor, aux: list[torch.Tensor] | torch.Tensor, sign: str = "proxy_overrates"
) -> torch.Tensor:
    """
    GARDO's uncertainty: disagreement between the proxy reward and auxiliary rewards, as rank gaps over the batch,
    normalised by the batch size (so it lies in (-1, 1)).

    With descending ranks (best = 1):

    * `sign="proxy_overrates"` (default, the paper's intent): `u = (mean_k rank_aux_k - rank_proxy) / B`, positive
      where the proxy ranks a sample *better* than the auxiliary rewards do -- where the proxy is least trustworthy.
    * `sign="released_code"`: `u = (rank_proxy - mean_k rank_aux_k) / B`, the released code's sign, positive where
      the proxy ranks the sample *worse* than the auxiliary rewards.
    """
    if sign not in ("proxy_overrates", "released_code"):
        raise ValueError(f"sign must be 'proxy_overrates' or 'released_code', got {sign!r}")
    aux = list(aux) if not isinstance(aux, torch.Tensor) else list(aux.unbind(0)) if aux.ndim == 2 else [aux]
    if not aux:
        raise ValueError("rank_gap_uncertainty needs at least one auxiliary reward")
    rank_proxy = descending_ranks(proxy)
    rank_aux = torch.stack([descending_ranks(a) for a in aux]).mean(0)
    u = (rank_aux - rank_proxy) if sign == "proxy_overrates" else (rank_proxy - rank_aux)
    return u / proxy.numel()


GATE_RULES = ("nonnegative", "batch")


def topk_gate(uncertainty: torch.Tensor, fraction: float, rule: str = "nonnegative") -> torch.Tensor:
    """
    Boolean gate of the most uncertain samples: GARDO applies its KL to these only.

    * `rule="nonnegative"` (default, the released code's rule): among the samples with `u >= 0`, the threshold is
      their `100 (1 - fraction)`-th percentile (linear interpolation, as `numpy.percentile`), and the samples with
      `u` strictly above it are gated -- about `fraction` of the non-negative samples, and none when they are tied.
    * `rule="batch"`: the `round(fraction * B)` samples with the largest `u` (at least 1 when `fraction > 0`), of
      which only those with `u > 0` are gated -- about `fraction` of the whole batch (about twice the released
      code's count, since about half of the rank gaps are non-negative).

    `fraction = 0` gates nothing. Returns a `[B]` boolean tensor.
    """
    if rule not in GATE_RULES:
        raise ValueError(f"rule must be one of {', '.join(repr(r) for r in GATE_RULES)}, got {rule!r}")
    n = uncertainty.numel()
    gate = torch.zeros(n, dtype=torch.bool, device=uncertainty.device)
    if fraction <= 0 or n == 0:
        return gate
    u = uncertainty.float().reshape(-1)
    if rule == "nonnegative":
        nonnegative = u[u >= 0]
        if nonnegative.numel() == 0:
            return gate
        # numpy.percentile(pos, 100 - 100 k) of the released code, linear interpolation
        q = min(max((100 - 100 * float(fraction)) / 100, 0.0), 1.0)
        threshold = torch.quantile(nonnegative, q, interpolation="linear")
        return u > threshold
    k = min(n, max(1, round(fraction * n)))
    top = torch.topk(u, k, sorted=True).indices
    gate[top] = True
    return gate & (u > 0)


class AdaptiveGateFraction:
    """
    GARDO's adaptive gated fraction `k` (the released code's `RiskCompensator`).

    `k` starts at `init` and stays in `[min_fraction, max_fraction]`. Each epoch, `update(u)` compares the mean of
    the non-negative uncertainties (`u >= 0`, as the released code) with a sliding window of the previous `window`
    epochs' means: above the window's max, `k *= up`; below its min, `k *= down`; then the mean joins the window.
    State: `state_dict()`/`load_state_dict()`.
    """

    def __init__(
        self,
        init: float = 0.1,
        min_fraction: float = 0.02,
        max_fraction: float = 0.2,
        window: int = 20,
        up: float = 1.1,
        down: float = 0.9,
    ):
        if not 0 <= min_fraction <= init <= max_fraction <= 1:
            raise ValueError(
                f"need 0 <= min_fraction <= init <= max_fraction <= 1, got {min_fraction}, {init}, {max_fraction}"
            )
        self.k = float(init)
        self.min_fraction, self.max_fraction = float(min_fraction), float(max_fraction)
        self.window, self.up, self.down = int(window), float(up), float(down)
        self.history: deque[float] = deque(maxlen=self.window)

    def update(self, uncertainty: torch.Tensor) -> float:
        """Update `k` from this epoch's uncertainties (one host sync per epoch); return the new `k`."""
        nonnegative = uncertainty[uncertainty >= 0]
        current = float(nonnegative.mean()) if nonnegative.numel() else 0.0
        if self.history:
            if current > max(self.history):
                self.k = min(self.k * self.up, self.max_fraction)
            elif current < min(self.history):
                self.k = max(self.k * self.down, self.min_fraction)
        self.history.append(current)
        return self.k

    def state_dict(self) -> dict:
        return {"k": self.k, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.k = float(state["k"])
        self.history = deque((float(h) for h in state["history"]), maxlen=self.window)


# ---------------------------------------------------------------------------------------------------------------------
# Reference refresh


class ReferenceRefresh:
    """
    When to copy the policy into the reference (GARDO's adaptive reset): after an epoch in which an observed KL
    exceeded `kl_threshold`, or when more than `every` epochs have passed since the last refresh (`strict=True`, the
    released code's `epoch - prev_epoch > reset_freq`; `strict=False`: at least `every`). `None`/0 disables either
    rule; there is no refresh at epoch 0.

    Call `observe_kl(kl)` after each optimizer step and `should_refresh(epoch)` at the start of each epoch; when it
    returns True, copy the weights (e.g. [`copy_adapter_weights`]) and call `mark(epoch)`.
    """

    def __init__(self, kl_threshold: float | None = 3e-4, every: int | None = 15, strict: bool = True):
        self.kl_threshold, self.every, self.strict = kl_threshold, every, strict
        self.pending = False
        self.last_epoch = 0

    def observe_kl(self, kl: float) -> None:
        if self.kl_threshold is not None and kl > self.kl_threshold:
            self.pending = True

    def should_refresh(self, epoch: int) -> bool:
        if epoch == 0:
            return False
        by_kl = self.pending
        elapsed = epoch - self.last_epoch
        by_time = bool(self.every) and (elapsed > self.every if self.strict else elapsed >= self.every)
        return by_kl or by_time

    def mark(self, epoch: int) -> None:
        self.pending = False
        self.last_epoch = epoch

    def state_dict(self) -> dict:
        return {"pending": self.pending, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.pending, self.last_epoch = bool(state["pending"]), int(state["last_epoch"])


@torch.no_grad()
def copy_adapter_weights(model: torch.nn.Module, source: str = "default", target: str = "ref") -> int:
    """
    Copy every parameter of adapter `source` into the same-shaped parameter of adapter `target` on one model, by name
    (peft names adapter parameters `...lora_A.<adapter>.weight`). Returns the number of tensors copied.
    """
    params = dict(model.named_parameters())
    src_tag, tgt_tag = f".{source}.", f".{target}."
    names = [name for name in params if src_tag in name]
    missing = [name for name in names if name.replace(src_tag, tgt_tag) not in params]
    if missing or not names:
        raise ValueError(f"adapter {target!r} lacks parameters of adapter {source!r}: {missing[:3] or 'none found'}")
    pairs = [(params[name], params[name.replace(src_tag, tgt_tag)]) for name in names]
    foreach_copy_([t for _, t in pairs], [s for s, _ in pairs])  # FSDP2's DTensor parameters too
    return len(pairs)


# ---------------------------------------------------------------------------------------------------------------------
# Diversity


def nn_cosine_distance(features: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """
    `d_i = min_{j != i, group(j) = group(i)} (1 - cos(f_i, f_j))`: each sample's distance to its nearest neighbour
    in its own prompt group (features are L2-normalised here). A sample alone in its group gets 0. `[B]`.
    """
    f = torch.nn.functional.normalize(features.float().flatten(1), dim=1)
    dist = 1 - f @ f.T
    same = group_ids[:, None] == group_ids[None, :]
    eye = torch.eye(len(f), dtype=torch.bool, device=f.device)
    dist = dist.masked_fill(~same | eye, float("inf"))
    d = dist.min(dim=1).values
    return torch.where(torch.isinf(d), torch.zeros_like(d), d).clamp_min(0)


def diversity_scaled_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, distances: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """
    GARDO's diversity-aware advantage: `A_i = (r_i - m_g) * w_i` with `m_g` the group's mean reward and
    `w_i = d_i / mean_g(d)` for samples with `r_i >= m_g`, `w_i = 1` otherwise. No std division here (the released
    code's `type="gardo"` tracker has none); [`GARDOTrainer`] divides the result by its `scale_rewards` std.
    """
    centered = group_advantages(rewards, group_ids, scale="none")
    inverse, n_groups = _group_index(group_ids)
    mean_d = _group_mean(distances.float(), inverse, n_groups)
    weight = torch.where(centered >= 0, distances.float() / (mean_d + eps), torch.ones_like(centered))
    return centered * weight


def within_group_pairwise_l2(samples: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between distinct samples of the same group (a diversity metric), 0-d tensor."""
    x = samples.float().flatten(1)
    dist = torch.cdist(x, x)
    same = (group_ids[:, None] == group_ids[None, :]) & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return dist[same].mean() if same.any() else torch.zeros((), device=x.device)
