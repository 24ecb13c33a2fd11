"""regtune.diffusion.functional against the formulas of METHODS.md §6, Flow-GRPO and DDPO, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from regtune.diffusion import functional as Fn


def _hand_log_density(x, mean, std):
    # log N(x; mean, std^2) per element, then the mean over the non-batch dims, written out
    out = []
    for b in range(x.shape[0]):
        vals = [
            -((xi - mi) ** 2) / (2 * std[b] ** 2) - math.log(std[b]) - 0.5 * math.log(2 * math.pi)
            for xi, mi in zip(x[b].flatten().tolist(), mean[b].flatten().tolist())
        ]
        out.append(sum(vals) / len(vals))
    return torch.tensor(out)


def test_sde_step_matches_flow_grpo_formula():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    s, s_next, a = 0.8, 0.55, 0.7
    noise = torch.randn_like(x)
    prev, logp, mean, std = Fn.sde_step_with_logprob(v, x, s, s_next, a, noise=noise)
    dt = s_next - s
    std_ref = a * math.sqrt(s / (1 - s))
    mean_ref = x * (1 + std_ref**2 / (2 * s) * dt) + v * (1 + std_ref**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(std, torch.full((3,), std_ref))
    torch.testing.assert_close(prev, mean_ref + std_ref * math.sqrt(-dt) * noise)
    step_std = [std_ref * math.sqrt(-dt)] * 3
    torch.testing.assert_close(logp, _hand_log_density(prev, mean_ref, step_std), rtol=1e-5, atol=1e-5)
    # re-scoring the same x' gives the same log-prob; a different x' a lower one (it is off the mean)
    _, logp2, _, _ = Fn.sde_step_with_logprob(v, x, s, s_next, a, prev_sample=prev)
    torch.testing.assert_close(logp2, logp)
    _, logp_far, _, _ = Fn.sde_step_with_logprob(v, x, s, s_next, a, prev_sample=prev + 3.0)
    assert (logp_far < logp).all()


def test_sde_step_per_sample_sigmas_and_clamp_at_one():
    torch.manual_seed(1)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    sig, nxt = torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.25])
    _, _, mean, std = Fn.sde_step_with_logprob(v, x, sig, nxt, 0.7, sigma_max_clamp=0.1, noise=torch.zeros_like(x))
    assert std[0] == pytest.approx(0.7 * math.sqrt(1.0 / 0.1))  # 1 - s replaced by the clamp at s = 1
    assert std[1] == pytest.approx(0.7 * math.sqrt(0.5 / 0.5))
    # noise level 0: the Euler (ODE) step x + dt v
    prev, logp, _, _ = Fn.sde_step_with_logprob(v, x, sig, nxt, 0.0)
    torch.testing.assert_close(prev, x + (nxt - sig)[:, None] * v)
    assert (logp == 0).all()


def test_ddim_step_matches_ddpo_formula():
    torch.manual_seed(2)
    x, eps = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    a_t, a_prev, eta = 0.4, 0.7, 1.0
    noise = torch.randn_like(x)
    prev, logp, mean, std = Fn.ddim_step_with_logprob(eps, x, a_t, a_prev, eta, prev_sample=None)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_ref = eta * math.sqrt(var)
    mean_ref = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std_ref**2) * eps
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(std, torch.full((2,), std_ref))
    target = mean_ref + std_ref * noise
    _, logp_t, _, _ = Fn.ddim_step_with_logprob(eps, x, a_t, a_prev, eta, prev_sample=target)
    torch.testing.assert_close(logp_t, _hand_log_density(target, mean_ref, [std_ref] * 2), rtol=1e-5, atol=1e-5)
    assert prev.shape == x.shape and torch.isfinite(logp).all()


def test_group_advantages_scales():
    r = torch.tensor([1.0, 3.0, 0.0, 10.0, 20.0, 30.0])
    g = torch.tensor([5, 5, 5, 9, 9, 9])
    m1 = 4 / 3
    centered = torch.tensor([1 - m1, 3 - m1, -m1, -10.0, 0.0, 10.0])
    torch.testing.assert_close(Fn.group_advantages(r, g, "none"), centered)
    s1 = torch.tensor([1 - m1, 3 - m1, -m1]).pow(2).mean().sqrt()
    s2 = torch.tensor([-10.0, 0.0, 10.0]).pow(2).mean().sqrt()
    expected = torch.cat([centered[:3] / (s1 + 1e-4), centered[3:] / (s2 + 1e-4)])
    torch.testing.assert_close(Fn.group_advantages(r, g, "group"), expected)
    torch.testing.assert_close(Fn.group_advantages(r, g, "batch"), centered / (r.std(unbiased=False) + 1e-4))
    with pytest.raises(ValueError, match="scale must be one of"):
        Fn.group_advantages(r, g, "std")


def test_ppo_clip_loss_by_hand():
    logp = torch.tensor([0.0, 0.2, -0.2, 0.2])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    eps = 0.1
    got = Fn.ppo_clip_loss(logp, old, adv, eps)
    expected = []
    for lp, a in zip(logp.tolist(), adv.tolist()):
        r = math.exp(lp)
        expected.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    torch.testing.assert_close(got, torch.tensor(expected))
    # ratio above 1 + eps with a positive advantage: clipped (no gradient); with a negative one: not clipped
    lp = logp.clone().requires_grad_(True)
    Fn.ppo_clip_loss(lp, old, adv, eps).sum().backward()
    assert lp.grad[1] == 0 and lp.grad[3] != 0 and lp.grad[0] == -1.0


def test_gated_kl_masked_mean():
    torch.manual_seed(3)
    mean, ref = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    std = torch.tensor([0.5, 1.0, 2.0, 0.25])
    kl = Fn.gaussian_step_kl(mean, ref, std)
    for b in range(4):
        assert kl[b] == pytest.approx(float(((mean[b] - ref[b]) ** 2).mean() / (2 * std[b] ** 2)), rel=1e-5)
    gate = torch.tensor([True, False, True, False])
    assert float(Fn.masked_mean(kl, gate)) == pytest.approx(float((kl[0] + kl[2]) / 2), rel=1e-6)
    assert float(Fn.masked_mean(kl, torch.zeros(4, dtype=torch.bool))) == 0.0
    assert float(Fn.masked_mean(kl)) == pytest.approx(float(kl.mean()))
    assert float(Fn.masked_mean(kl, gate, count=torch.tensor(4.0))) == pytest.approx(float((kl[0] + kl[2]) / 4))


def test_rank_gap_uncertainty_signs():
    proxy = torch.tensor([0.9, 0.1, 0.5, 0.3])  # ranks 1, 4, 2, 3
    aux1 = torch.tensor([0.0, 1.0, 0.5, 0.6])  # ranks 4, 1, 3, 2
    aux2 = torch.tensor([0.1, 0.9, 0.8, 0.2])  # ranks 4, 1, 2, 3
    u = Fn.rank_gap_uncertainty(proxy, [aux1, aux2])
    # mean aux rank - proxy rank, / B: sample 0 is over-rated by the proxy
    torch.testing.assert_close(u, torch.tensor([4 - 1, 1 - 4, 2.5 - 2, 2.5 - 3]) / 4)
    torch.testing.assert_close(Fn.rank_gap_uncertainty(proxy, [aux1, aux2], sign="released_code"), -u)
    assert int(u.argmax()) == 0
    with pytest.raises(ValueError, match="proxy_overrates"):
        Fn.rank_gap_uncertainty(proxy, [aux1], sign="up")


def test_topk_gate_positive_only():
    u = torch.tensor([0.3, -0.1, 0.5, 0.1, -0.4, 0.2, 0.0, 0.05, 0.01, 0.02])
    assert Fn.topk_gate(u, 0.2).nonzero().flatten().tolist() == [0, 2]  # the 2 most uncertain
    assert Fn.topk_gate(u, 0.01).nonzero().flatten().tolist() == [2]  # at least one
    assert not Fn.topk_gate(u, 0.0).any()
    # only positive uncertainties can be gated
    assert Fn.topk_gate(-u.abs() - 1, 0.5).sum() == 0
    assert Fn.topk_gate(u, 1.0).sum() == int((u > 0).sum())


def test_adaptive_gate_fraction_moves_within_bounds():
    gate = Fn.AdaptiveGateFraction(init=0.1, min_fraction=0.05, max_fraction=0.15, window=3)
    assert gate.update(torch.tensor([0.2, -1.0])) == 0.1  # first epoch: only fills the window
    assert gate.update(torch.tensor([0.3])) == pytest.approx(0.11)  # above the window's max: k * 1.1
    assert gate.update(torch.tensor([0.25])) == pytest.approx(0.11)  # inside [min, max]: unchanged
    assert gate.update(torch.tensor([0.1])) == pytest.approx(0.099)  # below the window's min: k * 0.9
    for value in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        gate.update(torch.tensor([value]))
    assert gate.k == 0.15  # clipped at max
    for i in range(15):  # decreasing means (negative values are ignored): k * 0.9 each time
        gate.update(torch.tensor([0.5**i, -2.0]))
    assert gate.k == 0.05  # clipped at min
    state = gate.state_dict()
    other = Fn.AdaptiveGateFraction(init=0.1, min_fraction=0.05, max_fraction=0.15, window=3)
    other.load_state_dict(state)
    assert other.k == gate.k and list(other.history) == list(gate.history) and len(other.history) == 3
    with pytest.raises(ValueError, match="min_fraction"):
        Fn.AdaptiveGateFraction(init=0.3, max_fraction=0.2)


def test_reference_refresh_rules():
    rr = Fn.ReferenceRefresh(kl_threshold=1e-3, every=5)
    assert not rr.should_refresh(0)
    rr.observe_kl(5e-4)
    assert not rr.should_refresh(1)
    rr.observe_kl(2e-3)  # above the threshold: refresh at the next epoch start
    assert rr.should_refresh(2)
    rr.mark(2)
    # strict (the released code): more than 5 epochs since the last refresh
    assert not rr.should_refresh(3) and not rr.should_refresh(7) and rr.should_refresh(8)
    rr.strict = False  # at least 5 epochs
    assert not rr.should_refresh(6) and rr.should_refresh(7)
    off = Fn.ReferenceRefresh(kl_threshold=None, every=None)
    off.observe_kl(1e9)
    assert not any(off.should_refresh(e) for e in range(1, 50))


def test_copy_adapter_weights_exact():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    cfg = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights="gaussian")
    model = get_peft_model(base, cfg)
    model.add_adapter("ref", cfg)
    params = dict(model.named_parameters())
    assert any(
        not torch.equal(p, params[n.replace(".default.", ".ref.")]) for n, p in params.items() if ".default." in n
    )
    assert Fn.copy_adapter_weights(model, "default", "ref") == 4
    for n, p in params.items():
        if ".default." in n:
            assert torch.equal(p, params[n.replace(".default.", ".ref.")])
    x = torch.randn(3, 4)
    y_policy = model(x)
    model.set_adapter("ref", inference_mode=True)
    torch.testing.assert_close(model(x), y_policy, rtol=0, atol=0)
    model.set_adapter("default")
    with pytest.raises(ValueError, match="lacks parameters"):
        Fn.copy_adapter_weights(model, "default", "nope")


def test_diversity_scaling_only_above_group_mean():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    d = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.1, 0.2, 0.2])
    adv = Fn.diversity_scaled_advantages(r, g, d)
    m0, m1 = 3.0, 2.0
    md0, md1 = 0.25, 0.25
    expected = [
        1 - m0,  # below the mean: unscaled
        2 - m0,
        (3 - m0) * 0.3 / md0,  # == mean: scaled (by d / mean d) but 0
        (6 - m0) * 0.4 / md0,
        0 - m1,
        0 - m1,
        (4 - m1) * 0.2 / md1,
        (4 - m1) * 0.2 / md1,
    ]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_nn_cosine_distance_within_groups():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    g = torch.tensor([0, 0, 0, 1, 1])
    d = Fn.nn_cosine_distance(f, g)
    c = 1 - 1 / math.sqrt(2)
    torch.testing.assert_close(d, torch.tensor([c, c, c, 2.0, 2.0]))
    assert float(Fn.nn_cosine_distance(f[:1], g[:1])) == 0.0  # alone in its group
    # within-group pixel L2 diversity
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    assert float(Fn.within_group_pairwise_l2(x, torch.tensor([0, 0, 1, 1]))) == pytest.approx(2.5)


def test_importing_regtune_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import sys, regtune; assert 'diffusers' not in sys.modules and 'regtune.diffusion' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_topk_gate_counts_as_the_released_code():
    """The default rule gates the u values above numpy's percentile 100 - 100 k of the non-negative ones."""
    import numpy as np

    u = torch.tensor([0.3, -0.1, 0.5, 0.1, -0.4, 0.2, 0.0, 0.05, 0.01, 0.02])
    # non-negative, sorted: 0, .01, .02, .05, .1, .2, .3, .5; 80th percentile = .2 + .6 * .1 = .26
    assert Fn.topk_gate(u, 0.2).nonzero().flatten().tolist() == [0, 2]
    assert Fn.topk_gate(u, 0.1).nonzero().flatten().tolist() == [2]  # 90th: .36
    assert Fn.topk_gate(u, 0.4).nonzero().flatten().tolist() == [0, 2, 5]  # 60th: .12
    assert not Fn.topk_gate(u, 0.0).any()
    assert not Fn.topk_gate(torch.tensor([-1.0, 0.0, 0.0, -2.0]), 0.5).any()  # ties at the top: none above
    # the option "batch": round(k B) of the whole batch, among u > 0
    assert Fn.topk_gate(u, 0.4, rule="batch").nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert Fn.topk_gate(u, 0.01, rule="batch").nonzero().flatten().tolist() == [2]  # at least one
    assert Fn.topk_gate(-u.abs() - 1, 0.5, rule="batch").sum() == 0
    with pytest.raises(ValueError, match="rule must be one of 'nonnegative', 'batch'"):
        Fn.topk_gate(u, 0.1, rule="all")
    # a batch of rank gaps: the count equals the released code's, about half of the "batch" rule's
    g = torch.Generator().manual_seed(0)
    proxy, aux1, aux2 = torch.rand(3, 1000, generator=g)
    gaps = Fn.rank_gap_uncertainty(proxy, [aux1, aux2])
    for k in (0.02, 0.1, 0.2):
        pos = gaps.numpy()[gaps.numpy() >= 0]
        expected = int((gaps.numpy() > np.percentile(pos, 100 - k * 100)).sum())
        got = int(Fn.topk_gate(gaps, k).sum())
        assert got == expected
        assert abs(got - k * len(pos)) <= 1  # the top k of the non-negative samples
        assert int(Fn.topk_gate(gaps, k, rule="batch").sum()) == round(k * 1000)
        assert got < 0.6 * round(k * 1000)


def test_reward_scale_batch_std_of_the_gathered_rewards():
    r = torch.tensor([1.0, 3.0, 0.0, 10.0])
    g = torch.tensor([0, 0, 1, 1])
    everything = torch.tensor([1.0, 3.0, 0.0, 10.0, 5.0, -5.0])  # e.g. the batch gathered over processes
    torch.testing.assert_close(
        Fn.reward_scale(r, g, "batch", batch_rewards=everything), (everything.std(unbiased=False) + 1e-4).expand(4)
    )
    centered = torch.tensor([-1.0, 1.0, -5.0, 5.0])
    torch.testing.assert_close(Fn.group_advantages(r, g), centered / (r.std(unbiased=False) + 1e-4))  # default
    torch.testing.assert_close(
        Fn.group_advantages(r, g, "group"), centered / (torch.tensor([1.0, 1.0, 5.0, 5.0]) + 1e-4)
    )
