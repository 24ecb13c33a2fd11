"""`GARDOTrainer`: GARDO (gated KL, reference refresh, diversity-aware advantages) on Flow-GRPO, with diffusers.

GARDO: "Reinforcing Diffusion Models without Reward Hacking", https://huggingface.co/papers/2512.24138.
Flow-GRPO: "Flow-GRPO: Training Flow Matching Models via Online RL", https://huggingface.co/papers/2505.05470.

One epoch: draw `prompts_per_epoch` prompts, sample `num_generations` images each with the SDE sampler (storing the
latents and log-probabilities of every step), score them with the proxy reward (and the auxiliary rewards for the
gate), compute per-group advantages, pick the gated samples, then take `optimizer_steps_per_epoch` optimizer steps
(each on a share of every group, accumulating the PPO-clip loss of every trained denoising step) with a KL to the
reference adapter on the gated samples only (reference outputs are computed for those samples only). Per epoch it
logs the mechanism's diagnostics: clip fraction, approx KL, gated fraction, KL, reference refreshes
(`metrics.jsonl`, `history` and the Accelerator's trackers).

Distributed (Accelerate/DDP): prompt groups never straddle processes; process `r` samples groups
`[r * G/W, (r + 1) * G/W)` with noise seeded per (seed, epoch, group), so the global batch is the same for any world
size. Rewards are gathered for the gate (ranks over the global batch), the adaptive k and the batch's reward std;
every process trains on the same share of its groups in each optimizer step; DDP averages the gradients over
processes. As in the released code, each process drops its own zero-advantage samples (and pads its kept count
to a multiple of its number of micro-batches, the same on every process, so that the DDP sync points agree), and
with `kl_normalization="micro_batch"` each process averages the KL over the gated samples of its own
micro-batches: with several processes, dropped samples or gated samples spread unevenly over processes, the
trajectory depends on the number of processes (it does not with `drop_zero_advantage=False` and
`kl_normalization="gated_count"`, which normalises by the global number of gated samples of the optimizer step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from accelerate import Accelerator

from . import functional as fn
from .config import GARDOConfig


logger = logging.getLogger(__name__)
RewardFn = Callable[[torch.Tensor, list[str]], "torch.Tensor | Sequence[float]"]
REF_ADAPTER = "ref"
CHECKPOINT = "checkpoint.pt"


def _as_tensor(values, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} returned {t.numel()} values for {n} images")
    return t


def _cpu_only_multiprocess() -> bool:
    """
    True under a multi-process launcher (torchrun) on a machine without CUDA: `Accelerator()` would otherwise run
    every process as a separate single-process job (accelerate picks gloo/MULTI_CPU only with `cpu=True`).
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _make_accelerator(config: GARDOConfig, accelerator: Accelerator | None) -> Accelerator:
    """
    The Accelerator for `config.mixed_precision`: `accelerator` if given (its precision must match), else a new one.
    accelerate's `AcceleratorState` is shared by every Accelerator of a process: one made earlier (e.g. by a
    transformers Trainer) with another precision would otherwise silently set this run's precision, so it is refused.
    """
    wanted = config.mixed_precision
    if accelerator is not None:
        given = getattr(accelerator, "mixed_precision", wanted)
        if given != wanted:
            raise ValueError(
                f"GARDOConfig.mixed_precision is {wanted!r} but the given accelerator uses mixed_precision="
                f"{given!r}. Set mixed_precision={given!r} in the config, or pass "
                f"Accelerator(mixed_precision={wanted!r})."
            )
        return accelerator
    from accelerate.state import AcceleratorState

    if "_mixed_precision" in AcceleratorState._shared_state:  # an Accelerator exists in this process
        existing = AcceleratorState().mixed_precision
        if existing != wanted:
            raise ValueError(
                f"GARDOConfig.mixed_precision is {wanted!r} but this process already holds an accelerate state with "
                f"mixed_precision={existing!r} (made by an earlier Accelerator or Trainer; accelerate shares it per "
                f"process and cannot change it). Set mixed_precision={existing!r} in the config (allowed: 'fp16', "
                "'bf16', 'no'), pass that Accelerator as `accelerator=`, or run GARDO in a fresh process."
            )
    return Accelerator(cpu=_cpu_only_multiprocess(), mixed_precision=wanted)


def _plain(value):
    """Python/numpy scalars and tuples as plain values that `torch.load(weights_only=True)` reads."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_tuples(value):
    """Lists back to tuples (`random.setstate` wants the tuples `random.getstate` gave)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _seed_for(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return h


def refuse_sharded_resume(model: torch.nn.Module, path: str) -> None:
    """Refuse to resume a GARDO checkpoint (full tensors) onto FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    sharded = [name for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if sharded:
        raise NotImplementedError(
            f"GARDOTrainer cannot resume {path} onto FSDP2-sharded parameters ({sharded[0]}, ...): the checkpoint "
            "holds full tensors and loading them into shards is not implemented. Resume without FSDP (one process "
            "or DDP), or start afresh with `resume=False`."
        )


class GARDOTrainer:
    r"""
    Train a peft LoRA on a diffusers flow-matching denoiser with GARDO (or its Flow-GRPO baselines).

    Args:
        config: [`GARDOConfig`].
        prompts: training prompts (drawn with replacement, one group per draw).
        reward_fn: the proxy reward, `reward_fn(images, prompts) -> [B]` (batched); images are `[B, 3, H, W]` in
            [0, 1].
        aux_reward_fns: auxiliary rewards for the uncertainty gate (the same signature); required when
            `kl_mode="gated"`.
        pipeline: a `StableDiffusion3Pipeline`: its transformer, scheduler, `encode_prompt` and VAE are used. Or give
            `denoiser` + `scheduler` + `encode_prompts` (+ `decode`, `latent_shape`) instead.
        denoiser: an `SD3Transformer2DModel` (or a module with its forward signature).
        scheduler: a `FlowMatchEulerDiscreteScheduler`.
        encode_prompts: `encode_prompts(prompts) -> (encoder_hidden_states, pooled_projections)`.
        decode: `decode(latents) -> images in [0, 1]`; default `(latents + 1) / 2` (pixel-space denoisers).
        latent_shape: `(C, H, W)` of one latent; default from the denoiser's config.
        eval_prompts: held-out prompts evaluated every `eval_every` epochs (deterministic ODE samples).
        eval_fns: held-out metrics `{name: fn(images, prompts) -> [B]}` (never trained on).
        feature_fn: per-image features for the diversity-aware advantages, `feature_fn(images) -> [B, D]`;
            default: the flattened images.
        accelerator: an `accelerate.Accelerator` with `mixed_precision == config.mixed_precision` (one is created
            otherwise; an accelerate state that exists in the process with another precision is refused).
    """

    def __init__(
        self,
        config: GARDOConfig,
        prompts: Sequence[str],
        reward_fn: RewardFn,
        aux_reward_fns: Sequence[RewardFn] = (),
        pipeline=None,
        denoiser: torch.nn.Module | None = None,
        scheduler=None,
        encode_prompts: Callable | None = None,
        decode: Callable | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        eval_prompts: Sequence[str] | None = None,
        eval_fns: dict[str, RewardFn] | None = None,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        accelerator: Accelerator | None = None,
    ):
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.accelerator = _make_accelerator(config, accelerator)
        self.pipeline = pipeline
        if pipeline is not None:
            denoiser = denoiser or pipeline.transformer
            scheduler = scheduler or pipeline.scheduler
            encode_prompts = encode_prompts or self._pipeline_encode
            decode = decode or self._pipeline_decode
            if latent_shape is None:
                factor = getattr(pipeline, "vae_scale_factor", 1)
                size = denoiser.config.sample_size
                latent_shape = (denoiser.config.in_channels, size, size)
                self._image_size = size * factor
        if denoiser is None or scheduler is None or encode_prompts is None:
            raise ValueError("GARDOTrainer needs `pipeline`, or `denoiser`, `scheduler` and `encode_prompts`")
        if config.kl_mode == "gated" and not aux_reward_fns:
            raise ValueError("kl_mode='gated' needs aux_reward_fns (the gate compares the proxy with them)")
        world = self.accelerator.num_processes
        if config.prompts_per_epoch % world:
            raise ValueError(
                f"prompts_per_epoch ({config.prompts_per_epoch}) must be divisible by the number of processes ({world})"
            )
        if not prompts:
            raise ValueError("prompts must not be empty")
        self.prompts, self.reward_fn, self.aux_reward_fns = list(prompts), reward_fn, list(aux_reward_fns)
        self.eval_prompts, self.eval_fns = list(eval_prompts or []), dict(eval_fns or {})
        self.feature_fn = feature_fn or (lambda images: images.flatten(1))
        self.encode_prompts, self.scheduler = encode_prompts, scheduler
        self.decode = decode or (lambda latents: ((latents + 1) / 2).clamp(0, 1))
        self.latent_shape = tuple(latent_shape or (denoiser.config.in_channels, *[denoiser.config.sample_size] * 2))
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(config.num_inference_steps)
        self.sigmas = scheduler.sigmas.float().cpu()

        torch.manual_seed(config.seed)  # the LoRA init
        self.lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            init_lora_weights=config.lora_init,
            target_modules=list(config.lora_target_modules),
        )
        for p in denoiser.parameters():
            p.requires_grad_(False)
        self.model = get_peft_model(denoiser, self.lora_config)
        if config.uses_reference:
            self.model.add_adapter(REF_ADAPTER, self.lora_config)
            fn.copy_adapter_weights(self.model, "default", REF_ADAPTER)
            self.model.set_adapter("default")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.ddp_model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.gate = fn.AdaptiveGateFraction(
            config.gate_init, config.gate_min, config.gate_max, window=config.gate_window
        )
        self.refresh = fn.ReferenceRefresh(
            config.ref_kl_threshold, config.ref_refresh_every, strict=config.ref_refresh_strict
        )
        self.epoch = 0
        self.refreshes = 0
        self.history: list[dict] = []
        # the settings a default resolves to, logged once at start
        self.resolved_settings = {
            "scale_rewards": config.resolved_scale_rewards,
            "mixed_precision": self.accelerator.mixed_precision,
            "autocast": bool(getattr(self.accelerator, "native_amp", False)),
            "num_train_timesteps": config.num_train_timesteps,
            "kl_normalization": config.kl_normalization,
            "ref_refresh_statistic": config.ref_refresh_statistic,
            "drop_zero_advantage": config.drop_zero_advantage,
        }
        if self.is_main_process:
            logger.info("GARDOTrainer: %s", ", ".join(f"{k}={v!r}" for k, v in self.resolved_settings.items()))

    # ----------------------------------------------------------------------------------------------------------------
    # pipeline plumbing

    def _pipeline_encode(self, prompts: list[str]):
        out = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, device=self.device
        )
        return out[0], out[2]

    def _pipeline_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _velocity(self, model, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
        ehs, pooled = cond
        t = torch.full((x.shape[0],), sigma * self.num_train_timesteps, device=x.device, dtype=x.dtype)
        return model(
            hidden_states=x, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled, return_dict=False
        )[0]

    @contextmanager
    def _adapter(self, name: str):
        """Run the peft model with adapter `name` (frozen), then switch back to the trainable policy adapter."""
        self.model.set_adapter(name, inference_mode=True)
        try:
            yield self.model
        finally:
            self.model.set_adapter("default")

    # ----------------------------------------------------------------------------------------------------------------
    # sampling

    def _draw_prompts(self, epoch: int) -> list[str]:
        g = torch.Generator().manual_seed(_seed_for(self.config.seed, epoch, 7))
        idx = torch.randint(len(self.prompts), (self.config.prompts_per_epoch,), generator=g)
        return [self.prompts[i] for i in idx.tolist()]

    @torch.no_grad()
    def sample(
        self, prompts: list[str], group_seeds: list[int], n_per_prompt: int, noise_level: float | None = None
    ) -> dict:
        """
        Sample `n_per_prompt` latents per prompt with the SDE sampler (the policy adapter; `noise_level=0`: ODE).
        Noise is drawn per group from `torch.Generator().manual_seed(group_seed)`. Returns latents `[B, T+1, ...]`,
        log-probs `[B, T]`, the images, the prompt of each sample and the conditioning.
        """
        a = self.config.noise_level if noise_level is None else noise_level
        T = len(self.sigmas) - 1
        noises = []
        for seed in group_seeds:
            g = torch.Generator().manual_seed(seed)
            noises.append(torch.randn((n_per_prompt, T + 1, *self.latent_shape), generator=g))
        noise = torch.cat(noises).to(self.device)
        sample_prompts = [p for p in prompts for _ in range(n_per_prompt)]
        cond = self.encode_prompts(sample_prompts)
        cond = tuple(c.to(self.device) for c in cond)
        x = noise[:, 0]
        latents, logps = [x], []
        clamp = float(1 - self.sigmas[1])
        model = self.model
        for i in range(T):
            v = self._velocity(model, x, float(self.sigmas[i]), cond)
            x, logp, _, _ = fn.sde_step_with_logprob(
                v, x, self.sigmas[i], self.sigmas[i + 1], a, noise=noise[:, i + 1], sigma_max_clamp=clamp
            )
            latents.append(x)
            logps.append(logp)
        images = self.decode(x)
        return {
            "latents": torch.stack(latents, 1),
            "log_probs": torch.stack(logps, 1),
            "images": images,
            "prompts": sample_prompts,
            "cond": cond,
        }

    def _score(self, score_fn, images, prompts, name) -> torch.Tensor:
        return _as_tensor(score_fn(images, prompts), len(prompts), name).to(self.device)

    # ----------------------------------------------------------------------------------------------------------------
    # one epoch

    def _rollout(self, epoch: int) -> dict:
        cfg, acc = self.config, self.accelerator
        prompts = self._draw_prompts(epoch)
        per_proc = cfg.prompts_per_epoch // acc.num_processes
        lo = acc.process_index * per_proc
        local = list(range(lo, lo + per_proc))
        batch = self.sample(
            [prompts[g] for g in local], [_seed_for(cfg.seed, epoch, g) for g in local], cfg.num_generations
        )
        images, sprompts = batch["images"], batch["prompts"]
        proxy = self._score(self.reward_fn, images, sprompts, "reward_fn")
        group_ids = torch.arange(len(local), device=self.device).repeat_interleave(cfg.num_generations)
        # "batch" scaling uses the std of the global batch (gathered), as Flow-GRPO's global_std
        all_proxy = acc.gather(proxy)
        n_global = all_proxy.numel()
        scale = fn.reward_scale(proxy, group_ids, cfg.resolved_scale_rewards, batch_rewards=all_proxy)
        if cfg.diversity_advantages:
            feats = self.feature_fn(images)
            distances = fn.nn_cosine_distance(feats, group_ids)
            adv = fn.diversity_scaled_advantages(proxy, group_ids, distances) / scale
        else:
            adv = fn.group_advantages(proxy, group_ids, "none") / scale
        batch["advantages"] = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        batch["proxy"] = proxy

        # the gate: ranks over the global batch
        if self.aux_reward_fns:
            aux = torch.stack(
                [self._score(f, images, sprompts, f"aux_reward_fns[{i}]") for i, f in enumerate(self.aux_reward_fns)]
            )
            all_aux = acc.gather(aux.T.contiguous()).T  # [n_aux, B_global]
            u = fn.rank_gap_uncertainty(all_proxy, list(all_aux), sign=cfg.uncertainty_sign)
            k = self.gate.update(u) if cfg.adaptive_gate else self.gate.k
            gate = fn.topk_gate(u, k, rule=cfg.gate_fraction_of)
        else:
            gate = torch.zeros(n_global, dtype=torch.bool, device=self.device)
        if cfg.kl_mode == "all":
            gate_kl = torch.ones(n_global, dtype=torch.bool, device=self.device)
        elif cfg.kl_mode == "gated":
            gate_kl = gate
        else:
            gate_kl = torch.zeros(n_global, dtype=torch.bool, device=self.device)
        n_local = len(sprompts)
        batch["gate_global"] = gate_kl.view(acc.num_processes, n_local)  # samples are gathered in process order
        batch["gated_fraction"] = float(gate.float().mean())
        batch["all_proxy"] = all_proxy
        batch["diversity"] = float(acc.gather(fn.within_group_pairwise_l2(images, group_ids).reshape(1)).mean())
        batch["epoch"] = epoch
        return batch

    def _step_members(self, n_local: int) -> list[torch.Tensor]:
        """
        Local sample indices of each optimizer step: step `s` of `S` trains on the members `m` of every prompt group
        with `floor(m S / G) = s`. Every process holds whole groups, so each step's global sample set (and every
        process's share of it) is the same for any number of processes.
        """
        cfg = self.config
        member = torch.arange(n_local, device=self.device) % cfg.num_generations
        step_of = member * cfg.optimizer_steps_per_epoch // cfg.num_generations
        return [(step_of == s).nonzero().flatten() for s in range(cfg.optimizer_steps_per_epoch)]

    def _micro_batches(self, batch: dict) -> list[list[torch.Tensor]]:
        """
        Local sample indices of each optimizer step's micro-batches.

        With `drop_zero_advantage=False`: the step's members (see [`_step_members`]) in chunks of `train_batch_size`
        (the last may be smaller). With it (the released code, `scripts/train_sd3_grpo_gardo.py`): the samples whose
        advantage is exactly 0 are dropped, and randomly chosen dropped samples are added back until the kept count
        is a multiple of the number of micro-batches M (the sum over steps of ceil(step size / train_batch_size));
        the kept samples, in step order, are split into M equal micro-batches, each optimizer step taking as many
        as it had. At least M samples are kept (the released code would fail on an empty batch). The random choice
        is seeded by (seed, epoch, process), so a resumed run draws the same; each process drops and pads its own
        samples.
        """
        cfg = self.config
        members = self._step_members(batch["latents"].shape[0])
        micro = [cfg.train_batch_size or m.numel() for m in members]
        if not cfg.drop_zero_advantage:
            return [list(m.split(size)) for m, size in zip(members, micro)]
        per_step = [math.ceil(m.numel() / size) for m, size in zip(members, micro)]
        n_batches = sum(per_step)
        order = torch.cat(members)
        keep = batch["advantages"][order] != 0
        kept = int(keep.sum())
        target = max(n_batches, math.ceil(kept / n_batches) * n_batches)
        if target > kept:
            dropped = (~keep).nonzero().flatten()
            g = torch.Generator().manual_seed(
                _seed_for(cfg.seed, batch.get("epoch", 0), self.accelerator.process_index, 11)
            )
            pick = torch.randperm(dropped.numel(), generator=g)[: target - kept].to(dropped.device)
            keep[dropped[pick]] = True
        chunks = list(order[keep].split(target // n_batches))
        bounds = np.cumsum([0, *per_step]).tolist()
        return [chunks[bounds[s] : bounds[s + 1]] for s in range(len(members))]

    def _train_on(self, batch: dict) -> dict:
        """
        `optimizer_steps_per_epoch` optimizer steps on the epoch's samples (see [`_micro_batches`]: zero-advantage
        samples dropped by default). Each accumulates the loss of every trained timestep of its micro-batches, as
        the released code accumulates over sample batches and timesteps; from the second step on the policy differs
        from the sampling policy, so PPO's clipping can bind. The loss of a micro-batch at a timestep is its mean
        PPO-clip loss plus `beta` times the KL term (`kl_normalization`), divided by the number of the step's
        micro-batches and timesteps. Returns the epoch's statistics: policy loss, `kl` (the mean KL per gated sample
        and timestep, averaged over steps), `kl_micro_step` (the released code's statistic: per step, the mean over
        micro-batches and timesteps of each one's mean gated KL, 0 where none is gated; averaged over steps), clip
        fraction (`|r - 1| > clip_range`), approx KL (`0.5 (logp - logp_old)^2`), trained samples (all processes),
        the number of optimizer steps.
        """
        cfg, acc = self.config, self.accelerator
        steps = list(range(cfg.num_train_timesteps))
        clamp = float(1 - self.sigmas[1])
        world = acc.num_processes
        plan = self._micro_batches(batch)
        gate_local = batch["gate_global"][acc.process_index]  # this process's samples' gate, [n_local]
        kl_values, kl_micro_values = [], []
        # diagnostics, summed over processes once at the end of the epoch:
        # [pg sum, clipped, approx kl sum, count (samples x timesteps), trained samples]
        sums = torch.zeros(5, device=self.device)
        n_gated_steps = None
        if cfg.uses_reference:  # each step's gated samples over all processes (one collective per epoch)
            local = torch.stack([gate_local[torch.cat(chunks)].sum() for chunks in plan]).float()
            n_gated_steps = acc.reduce(local, reduction="sum") if world > 1 else local
        for s_i, chunks in enumerate(plan):
            n_step = sum(c.numel() for c in chunks)  # this process's samples in the step
            kl_acc = torch.zeros((), device=self.device)  # KL summed over local gated samples and timesteps
            kl_micro = torch.zeros((), device=self.device)  # sum over micro-steps of each one's mean gated KL
            for c_i, sl in enumerate(chunks):
                idx = gate_local[sl].nonzero().flatten()  # gated samples of the micro-batch
                cond = tuple(c[sl] for c in batch["cond"])
                adv = batch["advantages"][sl]
                latents, old_logps = batch["latents"][sl], batch["log_probs"][sl]
                # reference means of the gated samples for every trained step, one adapter switch per micro-batch
                ref_means: dict[int, torch.Tensor] = {}
                if cfg.uses_reference and idx.numel():
                    cond_g = tuple(c[idx] for c in cond)
                    with torch.no_grad(), self._adapter(REF_ADAPTER) as ref:
                        for j in steps:
                            x_g = latents[idx, j]
                            v_ref = self._velocity(ref, x_g, float(self.sigmas[j]), cond_g)
                            _, _, ref_means[j], _ = fn.sde_step_with_logprob(
                                v_ref,
                                x_g,
                                self.sigmas[j],
                                self.sigmas[j + 1],
                                cfg.noise_level,
                                prev_sample=latents[idx, j + 1],
                                sigma_max_clamp=clamp,
                            )
                for n, j in enumerate(steps):
                    x, x_next = latents[:, j], latents[:, j + 1]
                    sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
                    ref_mean = ref_means.get(j)
                    sync = n == len(steps) - 1 and c_i == len(chunks) - 1
                    with nullcontext() if sync else acc.no_sync(self.ddp_model):
                        v = self._velocity(self.ddp_model, x, float(sigma), cond)
                        _, logp, mean, std = fn.sde_step_with_logprob(
                            v, x, sigma, sigma_next, cfg.noise_level, prev_sample=x_next, sigma_max_clamp=clamp
                        )
                        per_sample = fn.ppo_clip_loss(logp, old_logps[:, j], adv, cfg.clip_range)
                        # the mean over the step's samples: each micro-batch's mean / their number (equal sizes)
                        loss = per_sample.sum() / n_step
                        if cfg.uses_reference:
                            if ref_mean is not None:
                                kl = fn.gaussian_step_kl(mean[idx], ref_mean, std[idx])
                                if cfg.kl_normalization == "micro_batch":
                                    # the released code: the mean over this micro-batch's gated samples, one
                                    # micro-step of the accumulation; DDP averages over processes as it does there
                                    kl_term = kl.mean() / len(chunks)
                                else:
                                    # sum over the local gated samples / global gated count; DDP's mean over
                                    # processes is undone by `* world`: the gradient of the mean KL over all gated
                                    # samples of the step
                                    kl_term = kl.sum() * world / n_gated_steps[s_i].clamp_min(1)
                                kl_acc = kl_acc + kl.detach().sum()
                                kl_micro = kl_micro + kl.detach().mean()
                            else:
                                # keep every process's graph identical (DDP): a zero KL that touches the output
                                kl_term = mean.sum() * 0.0
                            loss = loss + cfg.beta * kl_term
                        acc.backward(loss / len(steps))
                    with torch.no_grad():
                        log_ratio = logp.detach() - old_logps[:, j]
                        clipped = ((torch.exp(log_ratio) - 1).abs() > cfg.clip_range).sum()
                        sums += torch.stack(
                            [
                                per_sample.detach().sum(),
                                clipped.float(),
                                0.5 * log_ratio.pow(2).sum(),
                                torch.tensor(float(len(sl)), device=self.device),
                                torch.tensor(float(len(sl)) if n == 0 else 0.0, device=self.device),
                            ]
                        )
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(self.ddp_model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.uses_reference:
                # one host sync per optimizer step; every process runs the same number of micro-steps
                totals = (
                    acc.reduce(torch.stack([kl_acc, kl_micro]), reduction="sum") if world > 1 else (kl_acc, kl_micro)
                )
                n_gated = n_gated_steps[s_i]
                kl_values.append(float(totals[0] / (n_gated.clamp_min(1) * len(steps))))
                kl_micro_values.append(float(totals[1] / (len(chunks) * len(steps) * world)))
                if cfg.ref_refresh_statistic == "micro_step_mean":
                    self.refresh.observe_kl(kl_micro_values[-1])
                elif n_gated > 0:
                    self.refresh.observe_kl(kl_values[-1])
        total = acc.reduce(sums, reduction="sum").tolist()
        count = max(total[3], 1.0)
        return {
            "policy_loss": total[0] / count,
            "kl": float(np.mean(kl_values)) if kl_values else 0.0,
            "kl_micro_step": float(np.mean(kl_micro_values)) if kl_micro_values else 0.0,
            "clip_fraction": total[1] / count,
            "approx_kl": total[2] / count,
            "trained_samples": int(round(total[4])),
            "optimizer_steps": self.config.optimizer_steps_per_epoch,
        }

    def _maybe_refresh(self, epoch: int) -> bool:
        if not self.config.uses_reference or not self.refresh.should_refresh(epoch):
            return False
        fn.copy_adapter_weights(self.model, "default", REF_ADAPTER)
        self.refresh.mark(epoch)
        self.refreshes += 1
        return True

    # ----------------------------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None) -> dict:
        """
        Held-out evaluation: `eval_generations` deterministic (ODE, fixed initial noise) samples per prompt; mean
        proxy reward, each `eval_fns` metric, within-group pixel L2 diversity and nearest-neighbour feature
        distance. Every process evaluates the same samples (cheap; no gather needed).
        """
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        if not prompts:
            return {}
        n = self.config.eval_generations
        batch = self.sample(prompts, [_seed_for(self.config.seed, 10**6, g) for g in range(len(prompts))], n, 0.0)
        images = batch["images"]
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(n)
        out = {"eval_proxy_reward": float(self._score(self.reward_fn, images, batch["prompts"], "reward_fn").mean())}
        for name, metric in self.eval_fns.items():
            out[f"eval_{name}"] = float(self._score(metric, images, batch["prompts"], name).mean())
        out["eval_diversity_l2"] = float(fn.within_group_pairwise_l2(images, group_ids))
        out["eval_diversity_feat"] = float(fn.nn_cosine_distance(self.feature_fn(images), group_ids).mean())
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # training loop, checkpoints

    def train(self, stop_after: int | None = None) -> list[dict]:
        """
        Train until `config.num_epochs` (or `stop_after` more epochs); resume from `output_dir/checkpoint.pt` if
        `config.resume`. Returns the per-epoch log (also in `output_dir/metrics.jsonl`).
        """
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        if cfg.resume and os.path.exists(os.path.join(cfg.output_dir, CHECKPOINT)):
            self.load_checkpoint(os.path.join(cfg.output_dir, CHECKPOINT))
        elif self.epoch == 0 and not self.history and self.is_main_process:
            # a fresh start (no checkpoint, or resume=False): do not append to an older run's log
            metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
            if os.path.exists(metrics):
                os.remove(metrics)
        if self.epoch == 0 and cfg.eval_every and self.eval_prompts and not self.history:
            self._log({"epoch": 0, **self.evaluate()})
        end = cfg.num_epochs if stop_after is None else min(cfg.num_epochs, self.epoch + stop_after)
        while self.epoch < end:
            epoch = self.epoch
            refreshed = self._maybe_refresh(epoch)
            self.model.train()
            batch = self._rollout(epoch)
            stats = self._train_on(batch)
            self.epoch = epoch + 1
            record = {
                "epoch": self.epoch,
                "reward": float(batch["all_proxy"].mean()),
                "diversity_l2": batch["diversity"],
                "gated_fraction": batch["gated_fraction"],
                "gate_k": self.gate.k,
                "kl": stats["kl"],
                "kl_micro_step": stats["kl_micro_step"],
                "trained_samples": stats["trained_samples"],
                "policy_loss": stats["policy_loss"],
                "clip_fraction": stats["clip_fraction"],
                "approx_kl": stats["approx_kl"],
                "optimizer_steps": stats["optimizer_steps"],
                "ref_refreshed": refreshed,
                "refreshes": self.refreshes,
            }
            if cfg.eval_every and self.eval_prompts and (self.epoch % cfg.eval_every == 0 or self.epoch == end):
                record.update(self.evaluate())
            self._log(record)
            if (cfg.save_every and self.epoch % cfg.save_every == 0) or self.epoch == end:
                self.save_checkpoint()
        if self.epoch >= cfg.num_epochs:
            self.save_lora_weights(os.path.join(cfg.output_dir, "lora"))
        return self.history

    def _log(self, record: dict) -> None:
        """
        Append one epoch's record to the history and `metrics.jsonl`, and send its numbers to the Accelerator's
        trackers (tensorboard, wandb, trackio, ...: pass `Accelerator(log_with=...)` and call its `init_trackers`)
        under `gardo/<key>`, at step = epoch.
        """
        self.history.append(record)
        if self.is_main_process:
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        numbers = {f"gardo/{k}": float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=int(record["epoch"]))

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if "lora_" in n}

    def save_checkpoint(self, path: str | None = None) -> str:
        """
        Write policy and reference adapters, optimizer, RNG states (torch, numpy, python), gate and refresh state,
        epoch, log and the settings (`config`) to `path` (default `output_dir/checkpoint.pt`) atomically (temp file
        + `os.replace`). The file holds only tensors and plain Python values, so that [`load_checkpoint`] reads it
        with `torch.load(weights_only=True)`.
        """
        path = path or os.path.join(self.config.output_dir, CHECKPOINT)
        np_state = np.random.get_state()
        state = {
            "format": 2,
            "adapters": self._adapter_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
                "python": _plain(random.getstate()),
            },
            "gate": self.gate.state_dict(),
            "refresh": self.refresh.state_dict(),
            "refreshes": self.refreshes,
            "epoch": self.epoch,
            "history": self.history,
            "config": self.config.to_dict(),
        }
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, path)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str) -> None:
        """
        Restore everything [`save_checkpoint`] wrote; training continues exactly where it stopped.

        The file is read with `torch.load(weights_only=True)`: a file that holds anything but tensors and plain
        values (e.g. a crafted pickle) is refused without running it. A checkpoint written with other settings is
        refused too, with the changed fields named (only `output_dir`, `resume`, `num_epochs`, `save_every` and
        `eval_every` may change). Resuming onto FSDP2-sharded (DTensor) parameters is refused: the checkpoint
        holds full tensors, and copying them into shards is not implemented yet.
        """
        refuse_sharded_resume(self.model, path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, a damaged zip, ...: never fall back to unsafe loading
            raise ValueError(
                f"cannot read the GARDO checkpoint {path}: it is not a checkpoint written by GARDOTrainer, or it holds "
                f"objects other than tensors and plain values, which are refused for safety ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Delete it, or use another output_dir."
            ) from None
        if not isinstance(state, dict) or "adapters" not in state or "config" not in state:
            raise ValueError(f"{path} is not a GARDO checkpoint (no adapters and settings in it)")
        changed = self.config.changed_fields(state["config"])
        if changed:
            listing = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items())
            raise ValueError(
                f"{path} was written with other settings: {listing}. Resuming it would continue another run. Use "
                "another output_dir, or resume=False to start this one from scratch."
            )
        params = dict(self.model.named_parameters())
        missing = sorted(set(state["adapters"]) ^ {n for n in params if "lora_" in n})
        if missing:
            raise ValueError(f"checkpoint {path} does not match the model's adapters: {missing[:4]}")
        with torch.no_grad():
            for name, value in state["adapters"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        kind, keys, *rest = state["rng"]["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        random.setstate(_as_tuples(state["rng"]["python"]))
        self.gate.load_state_dict(state["gate"])
        self.refresh.load_state_dict(state["refresh"])
        self.refreshes = int(state.get("refreshes", 0))
        self.epoch, self.history = int(state["epoch"]), list(state["history"])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy adapter in diffusers' LoRA format (`transformer_blocks.0.attn.to_q.lora_A.weight`, ...)."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name="default")
        prefix = "base_model.model."
        return {k[len(prefix) :] if k.startswith(prefix) else k: v.detach().cpu() for k, v in state.items()}

    def save_lora_weights(self, save_directory: str) -> str:
        """
        Save the policy LoRA with `StableDiffusion3Pipeline.save_lora_weights` (with its peft config as metadata),
        so that `pipe.load_lora_weights(save_directory)` loads it. Returns the directory.
        """
        from diffusers import StableDiffusion3Pipeline

        cls = type(self.pipeline) if self.pipeline is not None else StableDiffusion3Pipeline
        if self.is_main_process:
            metadata = self.lora_config.to_dict()
            metadata["target_modules"] = sorted(metadata["target_modules"])
            cls.save_lora_weights(
                save_directory,
                transformer_lora_layers=self.lora_state_dict(),
                transformer_lora_adapter_metadata=metadata,
            )
        self.accelerator.wait_for_everyone()
        return save_directory
