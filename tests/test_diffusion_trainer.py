"""GARDOTrainer on tiny diffusers models: switches, gated reference passes, refresh, resume, LoRA loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusion_tiny import (  # noqa: F401 (fresh_accelerate_state: a fixture)
    PROMPTS,
    fresh_accelerate_state,
    mean_brightness,
    pixel_std,
    red_minus_blue,
    tiny_config,
    tiny_sd3_pipeline,
    tiny_setup,
)

from regtune.diffusion import GARDOConfig, GARDOTrainer


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
        ({"num_generations": 1}, "num_generations must be an integer >= 2, got 1"),
        ({"clip_range": 0.0}, "clip_range must be a finite number > 0, got 0.0"),
        ({"gate_init": 0.5}, r"gate_init must lie in \[gate_min, gate_max\]"),
        ({"timestep_fraction": 1.5}, "timestep_fraction must be a finite number > 0 and <= 1, got 1.5"),
        ({"gate_fraction_of": "all"}, "gate_fraction_of must be one of 'nonnegative', 'batch', got 'all'"),
        ({"optimizer_steps_per_epoch": 0}, "optimizer_steps_per_epoch must be an integer >= 1, got 0"),
        ({"optimizer_steps_per_epoch": 9}, r"optimizer_steps_per_epoch must be <= num_generations \(8\)"),
        ({"learning_rate": "a"}, "learning_rate must be a finite number > 0, got 'a'"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0, got nan"),
        ({"beta": float("inf")}, "beta must be a finite number >= 0, got inf"),
        ({"num_epochs": 2.5}, "num_epochs must be an integer >= 1, got 2.5"),
        ({"num_epochs": "10"}, "num_epochs must be an integer >= 1, got '10'"),
        ({"num_epochs": True}, "num_epochs must be an integer >= 1, got True"),
        ({"diversity_advantages": "yes"}, "diversity_advantages must be True or False, got 'yes'"),
        ({"ref_kl_threshold": -1.0}, "ref_kl_threshold must be a finite number > 0, or None, got -1.0"),
        ({"train_batch_size": 0}, "train_batch_size must be an integer >= 1, or None, got 0"),
        (
            {"lora_target_modules": "to_q"},
            r"lora_target_modules must be a non-empty list of module names \(strings\), e.g. \['to_q', 'to_k'\], "
            r"got 'to_q' \(a string; write \['to_q'\]\)",
        ),
        ({"lora_target_modules": []}, "lora_target_modules must be a non-empty list of module names"),
        ({"lora_target_modules": ["to_q", 3]}, "lora_target_modules must be a non-empty list of module names"),
        ({"output_dir": ""}, "output_dir must be a string, got ''"),
        ({"scale_rewards": "std"}, "scale_rewards must be one of 'auto', 'batch', 'group', 'none', got 'std'"),
        ({"kl_normalization": "mean"}, "kl_normalization must be one of 'micro_batch', 'gated_count', got 'mean'"),
        (
            {"ref_refresh_statistic": "kl"},
            "ref_refresh_statistic must be one of 'micro_step_mean', 'gated_sample_mean', got 'kl'",
        ),
        ({"ref_refresh_strict": 1}, "ref_refresh_strict must be True or False, got 1"),
        ({"drop_zero_advantage": "no"}, "drop_zero_advantage must be True or False, got 'no'"),
        ({"mixed_precision": "fp32"}, "mixed_precision must be one of 'fp16', 'bf16', 'no', got 'fp32'"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GARDOConfig(**kwargs)


def test_config_reports_every_bad_field_at_once():
    bad = {
        "learning_rate": "a",
        "num_epochs": 2.5,
        "lora_target_modules": "to_q",
        "beta": float("nan"),
        "kl_mode": "some",
        "seed": 1.5,
        "max_grad_norm": 0,
    }
    with pytest.raises(ValueError) as err:
        GARDOConfig(**bad)
    message = str(err.value)
    assert all(f"{name} must be" in message for name in bad), message
    assert message.count(" must be ") == len(bad)
    # valid values of every type are accepted, tuples of modules become lists
    cfg = GARDOConfig(max_grad_norm=None, ref_refresh_every=None, lora_target_modules=("to_q",), learning_rate=1)
    assert cfg.lora_target_modules == ["to_q"] and cfg.learning_rate == 1


def test_reference_passes_only_for_gated_samples(tmp_path):
    cfg = tiny_config(tmp_path, num_epochs=1, eval_every=0, optimizer_steps_per_epoch=1)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    batch = trainer._rollout(0)
    gated = int(batch["gate_global"].sum())
    assert 0 < gated < 8  # the top 60% of the samples with a non-negative uncertainty
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
    cfg = tiny_config(tmp_path, num_epochs=1, eval_every=0, kl_mode=mode, optimizer_steps_per_epoch=1)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    trainer._train_on(trainer._rollout(0))
    ref = [c[1] for c in calls if c[0] == "ref"]
    if ref_batch is None:
        assert ref == [] and not any(".ref." in n for n, _ in trainer.model.named_parameters())
    else:
        assert ref == [ref_batch] * trainer.config.num_inference_steps


def test_kl_starts_at_zero_and_grows(tmp_path):
    cfg = tiny_config(tmp_path, kl_mode="all", ref_kl_threshold=None, eval_every=0, optimizer_steps_per_epoch=1)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    ref0 = _lora(trainer, "ref")
    policy0 = _lora(trainer, "default")
    assert all(torch.equal(policy0[n], ref0[n.replace(".default.", ".ref.")]) for n in policy0)
    first = trainer._train_on(trainer._rollout(0))
    assert first["kl"] == 0.0  # the reference is a copy of the policy before the first update
    second = trainer._train_on(trainer._rollout(1))
    assert second["kl"] > 0
    assert all(torch.equal(ref0[n], p) for n, p in _lora(trainer, "ref").items())  # the reference did not move


def test_reference_refresh_every_n_and_on_threshold(tmp_path):
    cfg = tiny_config(
        tmp_path / "every",
        kl_mode="all",
        ref_kl_threshold=None,
        ref_refresh_every=2,
        ref_refresh_strict=False,
        eval_every=0,
    )
    trainer = GARDOTrainer(cfg, **tiny_setup())
    history = trainer.train()
    assert [r["ref_refreshed"] for r in history] == [False, False, True]  # at the start of epoch 2 (>=)
    trainer.epoch = 4
    assert trainer._maybe_refresh(4)
    policy, ref = _lora(trainer, "default"), _lora(trainer, "ref")
    assert all(torch.equal(p, ref[n.replace(".default.", ".ref.")]) for n, p in policy.items())

    cfg = tiny_config(
        tmp_path / "thr",
        kl_mode="all",
        ref_kl_threshold=1e-30,
        ref_refresh_every=None,
        eval_every=0,
        optimizer_steps_per_epoch=1,
    )
    history = GARDOTrainer(cfg, **tiny_setup()).train()
    # epoch 0 has KL 0 (no refresh at epoch 1); epoch 1's KL > threshold -> refresh at the start of epoch 2
    assert [r["ref_refreshed"] for r in history] == [False, False, True]


def test_gated_kl_matches_masked_formula(tmp_path):
    """The trainer's KL statistic equals the mean of the per-step Gaussian KL over the gated samples."""
    from regtune.diffusion import gaussian_step_kl, sde_step_with_logprob

    trainer = GARDOTrainer(tiny_config(tmp_path, eval_every=0, optimizer_steps_per_epoch=1), **tiny_setup())
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
    cfg = tiny_config(tmp_path, eval_every=0, train_batch_size=2, timestep_fraction=0.7, kl_mode="all")
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    trainer._train_on(trainer._rollout(0))
    policy = [c[1] for c in calls if c[0] == "default" and c[2]]
    ref = [c[1] for c in calls if c[0] == "ref"]
    # 2 optimizer steps of 4 samples x 2 micro-batches of 2 x int(0.7 * 3) = 2 trained timesteps
    assert policy == [2] * 8 and ref == [2] * 8
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}


# ---- issue 12 items 7-9, issue 13: gate count, reward scale, several optimizer steps, safe and checked resume ----


def test_gate_count_follows_the_released_code(tmp_path):
    """The trainer's gate is the top k of the samples with u >= 0 (numpy's percentile rule), not k of the batch."""
    import numpy as np

    from regtune.diffusion import rank_gap_uncertainty

    cfg = tiny_config(tmp_path, prompts_per_epoch=4, gate_init=0.5, gate_max=0.5, adaptive_gate=False, eval_every=0)
    assert GARDOConfig().gate_fraction_of == "nonnegative"
    kwargs = tiny_setup()
    trainer = GARDOTrainer(cfg, **kwargs)
    counts = []
    for epoch in range(3):
        batch = trainer._rollout(epoch)
        images, prompts = batch["images"], batch["prompts"]
        aux = [fn(images, prompts) for fn in kwargs["aux_reward_fns"]]
        u = rank_gap_uncertainty(batch["proxy"], aux).numpy()
        expected = u > np.percentile(u[u >= 0], 50)
        assert batch["gate_global"].flatten().tolist() == expected.tolist()
        counts.append(int(expected.sum()))
    assert sum(counts) > 0
    other = GARDOTrainer(tiny_config(tmp_path / "b", **{**cfg.to_dict(), "gate_fraction_of": "batch"}), **tiny_setup())
    batch = other._rollout(0)
    assert int(batch["gate_global"].sum()) > counts[0]  # the option gates k of the whole batch (8 of 16 here)


@pytest.mark.parametrize(
    ("scale", "diversity"),
    [("batch", False), ("group", False), ("none", False), ("batch", True), ("auto", True), ("auto", False)],
)
def test_advantages_divided_by_the_reward_std(tmp_path, scale, diversity):
    from regtune.diffusion import nn_cosine_distance

    assert GARDOConfig().scale_rewards == "auto"  # the released code: no std with diversity advantages
    cfg = tiny_config(tmp_path, scale_rewards=scale, diversity_advantages=diversity, adv_clip_max=1e6, eval_every=0)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    batch = trainer._rollout(0)
    r = batch["proxy"].double()
    n = cfg.num_generations
    expected = []
    for g in range(cfg.prompts_per_epoch):
        rg = r[g * n : (g + 1) * n]
        centered = rg - rg.mean()
        if diversity:
            d = nn_cosine_distance(batch["images"][g * n : (g + 1) * n].flatten(1), torch.zeros(n)).double()
            centered = torch.where(centered >= 0, centered * d / d.mean(), centered)
        if scale == "batch" or (scale == "auto" and not diversity):  # auto: the released tracker's grpo type
            centered = centered / (r.std(unbiased=False) + 1e-4)
        elif scale == "group":
            centered = centered / (rg.std(unbiased=False) + 1e-4)
        expected.append(centered)
    torch.testing.assert_close(batch["advantages"].double(), torch.cat(expected), rtol=1e-4, atol=1e-6)


def test_several_optimizer_steps_per_epoch_let_clipping_bind(tmp_path):
    assert GARDOConfig().optimizer_steps_per_epoch == 2
    cfg = tiny_config(tmp_path, clip_range=1e-4, num_epochs=2, eval_every=0)
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    history = trainer.train()
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {4}  # 2 optimizer steps per epoch
    policy = [c[1] for c in calls if c[0] == "default" and c[2]]
    assert policy == [4] * (2 * 2 * cfg.num_inference_steps)  # each step: half of each of the 2 groups of 4
    for record in history:
        assert 0 < record["clip_fraction"] <= 1 and record["approx_kl"] > 0  # the second step clips
        assert record["optimizer_steps"] == 2 and "gated_fraction" in record and "refreshes" in record
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["clip_fraction"] for r in logged] == [r["clip_fraction"] for r in history]

    one = GARDOTrainer(tiny_config(tmp_path / "one", clip_range=1e-4, optimizer_steps_per_epoch=1), **tiny_setup())
    stats = one._train_on(one._rollout(0))
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] < 1e-8  # one step: the ratio is 1, nothing clips


def test_micro_batches_accumulate_to_the_same_step(tmp_path):
    full = GARDOTrainer(tiny_config(tmp_path / "a", eval_every=0, kl_mode="all"), **tiny_setup())
    micro = GARDOTrainer(tiny_config(tmp_path / "b", eval_every=0, kl_mode="all", train_batch_size=1), **tiny_setup())
    a, b = full._train_on(full._rollout(0)), micro._train_on(micro._rollout(0))
    assert a["clip_fraction"] == b["clip_fraction"]
    for (name, p), (_, q) in zip(full.model.named_parameters(), micro.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_diagnostics_reach_the_accelerator_trackers(tmp_path):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class ListTracker(GeneralTracker):
        name, requires_logging_directory = "list", False

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    tracker = ListTracker()
    accelerator = Accelerator(log_with=[tracker], mixed_precision=GARDOConfig().mixed_precision)
    accelerator.init_trackers("gardo")
    GARDOTrainer(tiny_config(tmp_path, num_epochs=1, eval_every=0), accelerator=accelerator, **tiny_setup()).train()
    step, values = tracker.logged[-1]
    assert step == 1
    for key in ("clip_fraction", "approx_kl", "gated_fraction", "kl", "refreshes", "reward"):
        assert f"gardo/{key}" in values


class _Evil:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_checkpoint_reader_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"adapters": _Evil(marker), "config": {}}, tmp_path / "checkpoint.pt")
    trainer = GARDOTrainer(tiny_config(tmp_path, eval_every=0), **tiny_setup())
    with pytest.raises(ValueError, match="refused for safety") as err:
        trainer.train()
    assert "checkpoint.pt" in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_testbed_cache_reader_refuses_a_malicious_pickle(tmp_path):
    from regtune.diffusion.testbed import TestbedConfig, cache_path, load_or_pretrain

    config = TestbedConfig(pretrain_steps=2, classifier_steps=2, width=4, cache_dir=str(tmp_path / "cache"))
    path = cache_path(config)
    assert path.endswith(".safetensors")
    state = load_or_pretrain(config, log=None)  # pretrains and writes the cache
    again = load_or_pretrain(config, log=None)  # reads it back
    assert again["pretrain_loss"] == pytest.approx(state["pretrain_loss"])
    assert all(torch.equal(state["transformer"][k], again["transformer"][k]) for k in state["transformer"])
    marker = tmp_path / "pwned"
    torch.save({"transformer": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="not a testbed safetensors file") as err:
        load_or_pretrain(config, log=None)
    assert path in str(err.value)
    assert not marker.exists()


def test_resume_refuses_changed_settings(tmp_path):
    GARDOTrainer(tiny_config(tmp_path, num_epochs=1, eval_every=0), **tiny_setup()).train()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    assert ckpt["config"]["learning_rate"] == 1e-2
    changed = tiny_config(tmp_path, num_epochs=2, eval_every=0, learning_rate=5e-3, beta=0.5)
    with pytest.raises(ValueError) as err:
        GARDOTrainer(changed, **tiny_setup()).train()
    message = str(err.value)
    assert "learning_rate (0.01 -> 0.005)" in message and "beta (1.0 -> 0.5)" in message
    assert "num_epochs" not in message  # more epochs continue the run
    longer = GARDOTrainer(tiny_config(tmp_path, num_epochs=2, eval_every=0), **tiny_setup())
    assert [r["epoch"] for r in longer.train()] == [1, 2]
    fresh = GARDOTrainer(changed.__class__(**{**changed.to_dict(), "resume": False}), **tiny_setup())
    assert [r["epoch"] for r in fresh.train()] == [1, 2]  # resume=False starts over
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]  # the old log is replaced, not appended to


# ---- issue 23: the released code's defaults (reward scale, KL and refresh normalisation, zero-advantage samples,
# ---- trained timesteps, precision), each against a hand computation of the released rule


@pytest.mark.parametrize(("diversity", "resolved"), [(True, "none"), (False, "batch")])
def test_scale_rewards_auto_resolves_as_the_released_tracker_and_is_logged(tmp_path, caplog, diversity, resolved):
    import logging

    assert GARDOConfig().scale_rewards == "auto"
    cfg = tiny_config(tmp_path, diversity_advantages=diversity, eval_every=0)
    # stat_tracking.py: type "gardo" -> (r - mean) * w (no std); type "grpo" -> (r - mean) / global std
    assert cfg.resolved_scale_rewards == resolved
    with caplog.at_level(logging.INFO, logger="regtune.diffusion.trainer"):
        trainer = GARDOTrainer(cfg, **tiny_setup())
    assert trainer.resolved_settings["scale_rewards"] == resolved
    assert f"scale_rewards={resolved!r}" in caplog.text
    for explicit in ("batch", "group", "none"):  # explicit values are kept
        assert tiny_config(
            tmp_path, scale_rewards=explicit, diversity_advantages=diversity
        ).resolved_scale_rewards == (explicit)


# micro-batches of 2 holding 2, 1, 0 and 1 gated samples
GATE = [True, True, True, False, False, False, False, True]


def _kl_trainer(tmp_path, **overrides):
    """A trainer whose reference differs from the policy, and a batch with zero advantages (only the KL has a
    gradient) gated as `GATE`, trained in one optimizer step of 4 micro-batches of 2."""
    cfg = tiny_config(
        tmp_path,
        eval_every=0,
        optimizer_steps_per_epoch=1,
        train_batch_size=2,
        max_grad_norm=None,
        drop_zero_advantage=False,
        **overrides,
    )
    trainer = GARDOTrainer(cfg, **tiny_setup())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if ".ref." in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = trainer._rollout(0)
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    batch["gate_global"] = torch.tensor([GATE])
    return trainer, batch


def _hand_kls(trainer, batch) -> list[torch.Tensor]:
    """Per trained timestep: every sample's KL ||mu - mu_ref||^2 / (2 std^2), averaged over dimensions, as a graph
    on the policy adapter (the SDE mean and std of Flow-GRPO's step, written out)."""
    sig = trainer.sigmas
    a = trainer.config.noise_level
    kls = []
    for j in range(trainer.config.num_train_timesteps):
        x = batch["latents"][:, j]
        s, s_next = float(sig[j]), float(sig[j + 1])
        one_minus = float(1 - sig[1]) if s >= 1 else 1 - s  # the sampler's clamp at s = 1
        std = a * (s / one_minus) ** 0.5
        dt = s_next - s
        means = []
        for adapter in ("ref", "default"):
            if adapter == "ref":
                with torch.no_grad(), trainer._adapter("ref") as model:
                    v = trainer._velocity(model, x, s, batch["cond"])
            else:
                v = trainer._velocity(trainer.model, x, s, batch["cond"])
            means.append(x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt)
        # the released KL divides by the std without its sqrt(-dt) factor (compute_log_prob's std_dev_t)
        kls.append(((means[1] - means[0]) ** 2 / (2 * std**2)).flatten(1).mean(1))
    return kls


def _capture_gradients(trainer) -> dict:
    """Replace the optimizer step by a copy of the accumulated gradients (the parameters do not move)."""
    grads = {}

    def step(*args, **kwargs):
        for n, p in trainer.model.named_parameters():
            if p.requires_grad:
                grads[n] = p.grad.detach().clone()

    trainer.optimizer.step = step
    return grads


@pytest.mark.parametrize("normalization", ["micro_batch", "gated_count"])
def test_kl_normalization_matches_a_hand_computation(tmp_path, normalization):
    assert GARDOConfig().kl_normalization == "micro_batch"
    trainer, batch = _kl_trainer(tmp_path, kl_normalization=normalization)
    grads = _capture_gradients(trainer)
    trainer._train_on(batch)
    kls = _hand_kls(trainer, batch)
    gate = torch.tensor(GATE)
    T, beta = len(kls), trainer.config.beta
    micro_batches = [torch.arange(i, i + 2) for i in range(0, 8, 2)]
    if normalization == "micro_batch":
        # train_sd3_grpo_gardo.py: loss = mean(policy) + beta * mean(kl over the micro-batch's gated samples) if one
        # is gated; accelerate divides by gradient_accumulation_steps = micro-batches x timesteps
        loss = sum(kl[mb[gate[mb]]].mean() for kl in kls for mb in micro_batches if gate[mb].any()) / (
            len(micro_batches) * T
        )
    else:  # the mean over all 4 gated samples of the step and over timesteps
        loss = sum(kl[gate].sum() for kl in kls) / (int(gate.sum()) * T)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    expected = torch.autograd.grad(beta * loss, list(params.values()))
    assert max(float(e.abs().max()) for e in expected) > 0
    for (name, _), e in zip(params.items(), expected):
        torch.testing.assert_close(grads[name], e, rtol=2e-3, atol=1e-9, msg=name)


@pytest.mark.parametrize("statistic", ["micro_step_mean", "gated_sample_mean"])
def test_refresh_statistic_matches_a_hand_computation(tmp_path, statistic):
    assert GARDOConfig().ref_refresh_statistic == "micro_step_mean"
    trainer, batch = _kl_trainer(tmp_path, ref_refresh_statistic=statistic)
    gate = torch.tensor(GATE)
    with torch.no_grad():
        kls = _hand_kls(trainer, batch)
    micro_batches = [torch.arange(i, i + 2) for i in range(0, 8, 2)]
    # train_sd3_grpo_gardo.py: info["kl_loss"] gets torch.mean(kl_loss) per micro-step (zeros where nothing is
    # gated), averaged at the optimizer step and compared with kl_thres
    released = float(
        torch.stack(
            [kl[mb[gate[mb]]].mean() if gate[mb].any() else torch.zeros(()) for kl in kls for mb in micro_batches]
        ).mean()
    )
    per_gated = float(torch.stack([kl[gate].mean() for kl in kls]).mean())
    assert released < per_gated  # the empty micro-batch counts as 0 and the gated pair weighs as one
    threshold = (released + per_gated) / 2
    trainer.refresh.kl_threshold = threshold
    stats = trainer._train_on(batch)
    assert stats["kl_micro_step"] == pytest.approx(released, rel=1e-3)
    assert stats["kl"] == pytest.approx(per_gated, rel=1e-3)
    used = released if statistic == "micro_step_mean" else per_gated
    assert trainer.refresh.pending == (used > threshold)


def test_refresh_every_n_epochs_is_strict_as_the_released_code(tmp_path):
    assert GARDOConfig().ref_refresh_strict
    every, epochs = 2, 6
    cfg = tiny_config(
        tmp_path, kl_mode="all", ref_kl_threshold=None, ref_refresh_every=every, eval_every=0, num_epochs=epochs
    )
    history = GARDOTrainer(cfg, **tiny_setup()).train()
    # train_sd3_grpo_gardo.py: `if (epoch != 0 and reset) or (epoch - prev_epoch) > config.reset_freq`
    expected, prev = [], 0
    for epoch in range(epochs):
        refresh = epoch - prev > every
        prev = epoch if refresh else prev
        expected.append(refresh)
    assert expected == [False, False, False, True, False, False]
    assert [r["ref_refreshed"] for r in history] == expected


def _released_kept_count(advantages: torch.Tensor, num_batches: int) -> int:
    """train_sd3_grpo_gardo.py: keep the non-zero advantages, pad with dropped ones to a multiple of num_batches."""
    mask = advantages != 0
    true_count = int(mask.sum())
    if true_count % num_batches:
        false_indices = torch.where(~mask)[0]
        num_to_change = num_batches - true_count % num_batches
        if len(false_indices) >= num_to_change:
            mask[false_indices[torch.randperm(len(false_indices))[:num_to_change]]] = True
    return int(mask.sum())


@pytest.mark.parametrize(
    ("steps", "micro", "zero", "num_batches"),
    [(1, 2, [0, 2, 3, 5, 6], 4), (2, None, [0, 2, 3, 5, 6], 2), (2, None, [1, 6], 2), (1, None, list(range(8)), 1)],
)
def test_zero_advantage_samples_are_dropped_and_padded(tmp_path, steps, micro, zero, num_batches):
    assert GARDOConfig().drop_zero_advantage
    cfg = tiny_config(tmp_path, eval_every=0, optimizer_steps_per_epoch=steps, train_batch_size=micro, kl_mode="none")
    trainer = GARDOTrainer(cfg, **tiny_setup())
    batch = trainer._rollout(0)
    batch["advantages"][zero] = 0.0
    seen = []
    original = trainer._velocity

    def wrapped(model, x, sigma, cond):
        if torch.is_grad_enabled():
            seen.append(x.detach().clone())
        return original(model, x, sigma, cond)

    trainer._velocity = wrapped
    stats = trainer._train_on(batch)
    expected = _released_kept_count(batch["advantages"].clone(), num_batches)
    if not expected:  # the released code fails on an empty batch; regtune keeps one sample per micro-batch
        expected = num_batches
    T = cfg.num_train_timesteps
    assert stats["trained_samples"] == expected
    assert len(seen) == num_batches * T and all(x.shape[0] == expected // num_batches for x in seen)
    first = torch.cat(seen[::T])  # every micro-batch's samples at the first timestep
    trained = [int((batch["latents"][:, 0] == x).flatten(1).all(1).nonzero()) for x in first]
    assert len(set(trained)) == expected
    kept = set(range(8)) - set(zero)
    assert kept <= set(trained)  # every non-zero advantage is trained, the rest are dropped ones

    full = GARDOTrainer(
        tiny_config(tmp_path / "all", **{**cfg.to_dict(), "drop_zero_advantage": False}), **tiny_setup()
    )
    b = full._rollout(0)
    b["advantages"][zero] = 0.0
    assert full._train_on(b)["trained_samples"] == 8


def test_trained_timesteps_round_down_as_the_released_code(tmp_path):
    cfg = tiny_config(
        tmp_path, eval_every=0, num_inference_steps=10, timestep_fraction=0.89, optimizer_steps_per_epoch=1
    )
    trainer = GARDOTrainer(cfg, **tiny_setup())
    calls = _record_velocity_calls(trainer)
    trainer._train_on(trainer._rollout(0))
    # train_sd3_grpo_gardo.py: num_train_timesteps = int(config.sample.num_steps * config.train.timestep_fraction)
    assert len([c for c in calls if c[0] == "default" and c[2]]) == int(10 * 0.89) == 8
    with pytest.raises(ValueError, match=r"timestep_fraction must leave at least one trained timestep.*got 0.2"):
        GARDOConfig(num_inference_steps=3, timestep_fraction=0.2)


def test_mixed_precision_is_a_field_logged_and_a_conflicting_state_refused(tmp_path, caplog):
    import logging

    from accelerate import Accelerator

    assert GARDOConfig().mixed_precision == "fp16"  # config/base.py: config.mixed_precision = "fp16"
    with pytest.raises(ValueError, match="mixed_precision must be one of 'fp16', 'bf16', 'no', got 'fp8'"):
        GARDOConfig(mixed_precision="fp8")
    with caplog.at_level(logging.INFO, logger="regtune.diffusion.trainer"):
        trainer = GARDOTrainer(tiny_config(tmp_path / "a", mixed_precision="bf16"), **tiny_setup())
    assert trainer.accelerator.mixed_precision == "bf16" and "mixed_precision='bf16'" in caplog.text
    # the process's accelerate state now holds bf16 (as after a bf16 transformers Trainer): another precision is
    # refused instead of silently training in bf16
    with pytest.raises(ValueError, match=r"mixed_precision is 'no' but this process already holds .*'bf16'"):
        GARDOTrainer(tiny_config(tmp_path / "b", mixed_precision="no"), **tiny_setup())
    with pytest.raises(ValueError, match=r"mixed_precision is 'fp16' but the given accelerator uses .*'bf16'"):
        GARDOTrainer(tiny_config(tmp_path / "c"), accelerator=Accelerator(), **tiny_setup())
