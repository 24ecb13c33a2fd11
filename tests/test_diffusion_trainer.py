"""GARDOTrainer on tiny diffusers models: switches, gated reference passes, refresh, resume, LoRA loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusion_tiny import (
    PROMPTS,
    mean_brightness,
    pixel_std,
    red_minus_blue,
    tiny_config,
    tiny_sd3_pipeline,
    tiny_setup,
)

from regtune.diffusion import GARDOConfig, GARDOTrainer


def _lora(trainer, adapter="default"):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if f".{adapter}." in n}


def _record_velocity_calls(trainer):
    """Wrap `_velocity` to log (active adapter, batch size) of every denoiser call."""
    calls = []
    original = trainer._velocity

    def wrapped(model, x, sigma, cond):
        calls.append((trainer.model.active_adapter, x.shape[0], torch.is_grad_enabled()))
        return original(model, x, sigma, cond)

    trainer._velocity = wrapped
    return calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kl_mode": "some"}, "kl_mode must be one of 'gated', 'all', 'none'"),
        ({"uncertainty_sign": "up"}, "uncertainty_sign must be one of 'proxy_overrates', 'released_code'"),
        ({"scale_rewards": "std"}, "scale_rewards must be one of"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"clip_range": 0.0}, "clip_range must be > 0"),
        ({"gate_init": 0.5}, r"gate_init must lie in \[gate_min, gate_max\]"),
        ({"timestep_fraction": 1.5}, "timestep_fraction must be <= 1"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GARDOConfig(**kwargs)


def test_reference_passes_only_for_gated_samples(tmp_path):
    trainer = GARDOTrainer(tiny_config(tmp_path, num_epochs=1, eval_every=0), **tiny_setup())
    calls = _record_velocity_calls(trainer)
    batch = trainer._rollout(0)
    gated = int(batch["gate_global"].sum())
    assert 0 < gated < 8  # top 25% of 8 samples among those with positive uncertainty
    trainer._train_on(batch)
    ref = [c for c in calls if c[0] == "ref"]
    policy = [c for c in calls if c[0] == "default" and c[2]]
    steps = trainer.config.num_inference_steps
    assert len(policy) == steps and all(c[1] == 8 for c in policy)  # the policy sees every sample
    assert len(ref) == steps and all(c[1] == gated and not c[2] for c in ref)  # the reference only the gated ones
    assert trainer.model.active_adapter == "default"
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".default." in n)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)


@pytest.mark.parametrize(("mode", "ref_batch"), [("all", 8), ("none", None)])
def test_kl_switches(tmp_path, mode, ref_batch):
    trainer = GARDOTrainer(tiny_config(tmp_path, num_epochs=1, eval_every=0, kl_mode=mode), **tiny_setup())
    calls = _record_velocity_calls(trainer)
    trainer._train_on(trainer._rollout(0))
    ref = [c[1] for c in calls if c[0] == "ref"]
    if ref_batch is None:
        assert ref == [] and not any(".ref." in n for n, _ in trainer.model.named_parameters())
    else:
        assert ref == [ref_batch] * trainer.config.num_inference_steps


def test_kl_starts_at_zero_and_grows(tmp_path):
    trainer = GARDOTrainer(tiny_config(tmp_path, kl_mode="all", ref_kl_threshold=None, eval_every=0), **tiny_setup())
    ref0 = _lora(trainer, "ref")
    policy0 = _lora(trainer, "default")
    assert all(torch.equal(policy0[n], ref0[n.replace(".default.", ".ref.")]) for n in policy0)
    first = trainer._train_on(trainer._rollout(0))
    assert first["kl"] == 0.0  # the reference is a copy of the policy before the first update
    second = trainer._train_on(trainer._rollout(1))
    assert second["kl"] > 0
    assert all(torch.equal(ref0[n], p) for n, p in _lora(trainer, "ref").items())  # the reference did not move


def test_reference_refresh_every_n_and_on_threshold(tmp_path):
    cfg = tiny_config(tmp_path / "every", kl_mode="all", ref_kl_threshold=None, ref_refresh_every=2, eval_every=0)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    history = trainer.train()
    assert [r["ref_refreshed"] for r in history] == [False, False, True]  # at the start of epoch 2
    trainer.epoch = 4
    assert trainer._maybe_refresh(4)
    policy, ref = _lora(trainer, "default"), _lora(trainer, "ref")
    assert all(torch.equal(p, ref[n.replace(".default.", ".ref.")]) for n, p in policy.items())

    cfg = tiny_config(tmp_path / "thr", kl_mode="all", ref_kl_threshold=1e-30, ref_refresh_every=None, eval_every=0)
    history = GARDOTrainer(cfg, **tiny_setup()).train()
    # epoch 0 has KL 0 (no refresh at epoch 1); epoch 1's KL > threshold -> refresh at the start of epoch 2
    assert [r["ref_refreshed"] for r in history] == [False, False, True]


def test_gated_kl_matches_masked_formula(tmp_path):
    """The trainer's KL statistic equals the mean of the per-step Gaussian KL over the gated samples."""
    from regtune.diffusion import gaussian_step_kl, sde_step_with_logprob

    trainer = GARDOTrainer(tiny_config(tmp_path, eval_every=0), **tiny_setup())
    trainer._train_on(trainer._rollout(0))
    with torch.no_grad():  # make the adapters differ, then recompute the KL by hand
        for n, p in trainer.model.named_parameters():
            if ".ref." in n:
                p.add_(0.05 * torch.randn_like(p))
    batch = trainer._rollout(1)
    gate = batch["gate_global"][0]
    expected = []
    sig = trainer.sigmas
    for j in range(trainer.config.num_inference_steps):
        x, x_next = batch["latents"][:, j], batch["latents"][:, j + 1]
        means = []
        for adapter in ("default", "ref"):
            with torch.no_grad(), trainer._adapter(adapter) as model:
                v = trainer._velocity(model, x, float(sig[j]), batch["cond"])
                _, _, mean, std = sde_step_with_logprob(
                    v, x, sig[j], sig[j + 1], 0.7, prev_sample=x_next, sigma_max_clamp=float(1 - sig[1])
                )
            means.append(mean)
        expected.append(gaussian_step_kl(means[0], means[1], std)[gate].mean())
    stats = trainer._train_on(batch)
    assert stats["kl"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    setup_kwargs = {"ref_refresh_every": 2, "save_every": 1}
    full = GARDOTrainer(tiny_config(tmp_path / "full", num_epochs=4, **setup_kwargs), **tiny_setup())
    full.train()
    part = GARDOTrainer(tiny_config(tmp_path / "part", num_epochs=4, **setup_kwargs), **tiny_setup())
    part.train(stop_after=2)  # "interrupted" after epoch 2, checkpoint on disk
    assert part.epoch == 2 and not os.path.exists(tmp_path / "part" / "lora")
    resumed = GARDOTrainer(tiny_config(tmp_path / "part", num_epochs=4, **setup_kwargs), **tiny_setup())
    resumed.train()
    assert resumed.epoch == 4
    a, b = _lora(full), _lora(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    a, b = _lora(full, "ref"), _lora(resumed, "ref")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert full.gate.state_dict() == resumed.gate.state_dict()
    drop = ("ref_refreshed",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in full.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed.history
    ]
    with open(tmp_path / "part" / "metrics.jsonl") as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs == [0, 1, 2, 3, 4]
    assert not [f for f in os.listdir(tmp_path / "part") if ".tmp" in f]  # atomic writes leave no temp file


def test_gated_mode_needs_aux_rewards(tmp_path):
    kwargs = tiny_setup()
    kwargs["aux_reward_fns"] = []
    with pytest.raises(ValueError, match="aux_reward_fns"):
        GARDOTrainer(tiny_config(tmp_path), **kwargs)
    with pytest.raises(ValueError, match="prompts_per_epoch"):
        _odd_world(tmp_path)


def _odd_world(tmp_path):
    class TwoProcesses:
        num_processes = 2

    GARDOTrainer(tiny_config(tmp_path, prompts_per_epoch=3), accelerator=TwoProcesses(), **tiny_setup())


def test_saved_lora_loads_into_a_diffusers_pipeline(tmp_path):
    pipe = tiny_sd3_pipeline()
    cfg = tiny_config(
        tmp_path,
        num_epochs=2,
        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        eval_every=0,
        lora_init="gaussian",
    )
    trainer = GARDOTrainer(
        cfg,
        pipeline=pipe,
        prompts=list(PROMPTS),
        reward_fn=mean_brightness,
        aux_reward_fns=[pixel_std, red_minus_blue],
    )
    trainer.train()
    lora_dir = tmp_path / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()

    fresh = tiny_sd3_pipeline()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs, _, pooled, _ = fresh.encode_prompt(["a square", "a frame"], None, None, do_classifier_free_guidance=False)
    t = torch.tensor([500.0, 500.0])

    def out(p):
        with torch.no_grad():
            return p.transformer(
                hidden_states=latents, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled
            ).sample

    base = out(fresh)
    fresh.load_lora_weights(str(lora_dir))
    loaded = out(fresh)
    trained = out(pipe)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA changes the model
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)  # and reproduces the trained one
    images = fresh(
        ["a square"], num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="pt"
    ).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_minibatches_and_timestep_fraction(tmp_path):
    cfg = tiny_config(tmp_path, eval_every=0, train_batch_size=4, timestep_fraction=0.5, kl_mode="all")
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    trainer._train_on(trainer._rollout(0))
    policy = [c[1] for c in calls if c[0] == "default" and c[2]]
    ref = [c[1] for c in calls if c[0] == "ref"]
    assert policy == [4] * 4 and ref == [4] * 4  # 2 optimizer steps x ceil(0.5 * 3) = 2 trained steps
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}
