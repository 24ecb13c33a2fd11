"""SAM perturbation and GLAD's SAM-referenced gradient against hand-computed values and the formula (docs/glad.md)."""

from __future__ import annotations

import math

import pytest
import torch

from regtune.functional.glad import glad_diagnostics_, glad_perturb_, glad_restore_, sam_referenced_gradient
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
def test_in_place_step_matches_the_formula(glad_lambda):
    """perturb -> (second backward accumulates g_sam) -> diagnostics -> restore, against the formula."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    g_sam = [a + 0.4 * torch.randn(s, generator=gen) for a, s in zip(g, shapes)]
    params, grads = [t.clone() for t in theta], [t.clone() for t in g]
    rho = 0.3
    flat_g, flat_sam = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in g_sam])

    saved, norm, scale = glad_perturb_(params, grads, rho, glad_lambda)
    torch.testing.assert_close(norm, flat_g.norm())
    for p, t, a in zip(params, theta, g):
        torch.testing.assert_close(p, t + rho * a / flat_g.norm())  # theta + eps
    c = (1 - glad_lambda) / glad_lambda
    for buffer, a in zip(grads, g):
        torch.testing.assert_close(buffer, c * a)  # rescaled in place
    torch._foreach_add_(grads, g_sam)  # what the second backward does

    cos, rel = glad_diagnostics_(params, saved, grads, norm, scale, glad_lambda)
    torch.testing.assert_close(cos, torch.nn.functional.cosine_similarity(flat_g, flat_sam, dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel, (flat_sam - flat_g).norm() / flat_g.norm(), atol=1e-5, rtol=1e-4)

    glad_restore_(params, saved, grads, glad_lambda)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))  # restored exactly
    for final, a, b in zip(grads, g, g_sam):
        torch.testing.assert_close(final, a + glad_lambda * (b - a))


def test_perturbation_holds_one_copy_of_the_parameters():
    params, grads = [torch.ones(1000), torch.ones(10)], [torch.ones(1000), torch.ones(10)]
    buffers = [g.data_ptr() for g in grads]
    saved, _, _ = glad_perturb_(params, grads, 0.1, 0.5)
    assert sum(t.numel() for t in saved) == 1010
    assert [g.data_ptr() for g in grads] == buffers  # the gradient buffers are reused, not copied
