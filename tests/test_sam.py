"""SAM perturbation and GLAD's SAM-referenced gradient against hand-computed values and the formula (docs/glad.md)."""

from __future__ import annotations

import math

import pytest
import torch

from regtune.functional.glad import (
    glad_combine_,
    glad_save_and_perturb_,
    low_precision,
    sam_referenced_gradient,
)
from regtune.functional.sam import global_grad_norm, sam_perturbation


def _loss(theta):  # L = t1^2 + 2 t2^2, grad = (2 t1, 4 t2)
    return theta[0] ** 2 + 2 * theta[1] ** 2


def test_two_parameter_example_by_hand():
    theta = [torch.tensor(1.0), torch.tensor(1.0)]
    g = [torch.tensor(2.0), torch.tensor(4.0)]  # grad at (1, 1)
    rho = 0.1 * math.sqrt(20.0)  # ||g|| = sqrt(20) -> eps = 0.1 * g = (0.2, 0.4)
    torch.testing.assert_close(global_grad_norm(g), torch.tensor(math.sqrt(20.0)))
    eps = sam_perturbation(g, rho)
    torch.testing.assert_close(torch.stack(eps), torch.tensor([0.2, 0.4]))
    g_sam = [torch.tensor(2.0 * 1.2), torch.tensor(4.0 * 1.4)]  # grad at (1.2, 1.4) = (2.4, 5.6)
    final = sam_referenced_gradient(g, g_sam, 0.5)
    torch.testing.assert_close(torch.stack(final), torch.tensor([2.2, 4.8]))
    # lambda = 0 is the plain gradient itself, lambda = 1 the SAM gradient
    assert all(a is b for a, b in zip(sam_referenced_gradient(g, g_sam, 0.0), g))
    torch.testing.assert_close(torch.stack(sam_referenced_gradient(g, g_sam, 1.0)), torch.tensor([2.4, 5.6]))

    # the same numbers through autograd
    params = torch.stack(theta).requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(params), params)
    perturbed = (params + torch.stack(sam_perturbation(list(grad), rho))).detach().requires_grad_(True)
    (grad_sam,) = torch.autograd.grad(_loss(perturbed), perturbed)
    torch.testing.assert_close(grad_sam, torch.tensor([2.4, 5.6]))


def test_zero_gradient_gives_zero_perturbation():
    eps = sam_perturbation([torch.zeros(3), torch.zeros(2, 2)], rho=0.5)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in eps)


def test_sam_referenced_gradient_lives_in_functional_glad():
    from regtune.functional import glad, sam

    # GLAD's math lives in functional/glad.py, which imports sam.py; sam.py does not import it back (no cycle)
    assert glad.global_grad_norm is sam.global_grad_norm
    assert not hasattr(sam, "sam_referenced_gradient")


@pytest.mark.parametrize("glad_lambda", [0.25, 0.5, 1.0])
def test_save_perturb_combine_matches_the_formula(glad_lambda):
    """The trainer's step: save theta, perturb (the gradient buffers hold eps and are dropped), second backward into
    fresh buffers, then combine in place and restore theta exactly -- against the formula, with one bfloat16
    parameter whose g is kept rather than recovered."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    theta[2] = theta[2].bfloat16()
    g = [torch.randn(s, generator=gen).to(t.dtype) for s, t in zip(shapes, theta)]
    g_sam = [(a.float() + 0.4 * torch.randn(s, generator=gen)).to(a.dtype) for a, s in zip(g, shapes)]
    params, grads = [t.clone() for t in theta], [t.clone() for t in g]
    keep = [low_precision(p) for p in params]
    assert keep == [False, False, True]
    rho = 0.3
    flat_g = torch.cat([t.float().flatten() for t in g])
    flat_sam = torch.cat([t.float().flatten() for t in g_sam])
    buffers = [b.data_ptr() for b in grads]

    saved, norm, scale = glad_save_and_perturb_(params, grads, rho, keep=keep)
    torch.testing.assert_close(norm, flat_g.norm())
    for p, t, a in zip(params, theta, g):
        expected = (t.float() + rho * a.float() / flat_g.norm()).to(t.dtype)
        torch.testing.assert_close(p, expected)  # theta + eps, in the parameter's dtype
    assert [b.data_ptr() for b in grads] == buffers  # eps computed in the gradient buffers, no copy
    assert torch.equal(grads[2], g[2])  # the kept g is untouched
    kept = [b if k else None for b, k in zip(grads, keep)]
    sam_grads = [t.clone() for t in g_sam]  # what the second backward leaves in the fresh buffers

    cos, rel = glad_combine_(params, saved, sam_grads, scale, glad_lambda, kept_grads=kept, grad_norm=norm)
    torch.testing.assert_close(cos, torch.nn.functional.cosine_similarity(flat_g, flat_sam, dim=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(rel, (flat_sam - flat_g).norm() / flat_g.norm(), atol=1e-4, rtol=1e-3)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))  # restored exactly (a copy)
    for final, a, b in zip(sam_grads[:2], g[:2], g_sam[:2]):  # float32: g recovered from the perturbation
        torch.testing.assert_close(final, a + glad_lambda * (b - a), atol=1e-5, rtol=1e-5)
    expected = (g[2].float() + glad_lambda * (g_sam[2].float() - g[2].float())).to(torch.bfloat16)
    torch.testing.assert_close(sam_grads[2], expected, atol=2e-2, rtol=2e-2)  # bfloat16: g kept exactly

    # without diagnostics the gradients are the same, bit for bit
    params2 = [t.clone() for t in theta]
    grads2 = [t.clone() for t in g]
    saved2, _, scale2 = glad_save_and_perturb_(params2, grads2, rho, keep=keep)
    sam2 = [t.clone() for t in g_sam]
    kept2 = [b if k else None for b, k in zip(grads2, keep)]
    assert glad_combine_(params2, saved2, sam2, scale2, glad_lambda, kept_grads=kept2) is None
    assert all(torch.equal(a, b) for a, b in zip(sam2, sam_grads))


def test_save_and_perturb_holds_one_copy_of_the_parameters():
    params, grads = [torch.ones(1000), torch.ones(10)], [torch.ones(1000), torch.ones(10)]
    saved, _, _ = glad_save_and_perturb_(params, grads, 0.1)
    assert sum(t.numel() for t in saved) == 1010  # theta; the gradient buffers now hold eps, to be dropped
    torch.testing.assert_close(torch.cat(grads), torch.cat(params) - 1.0)
