"""SAM perturbation and GLAD's SAM-referenced gradient against hand-computed values (METHODS.md §3)."""

from __future__ import annotations

import math

import torch

from regtune.functional.sam import global_grad_norm, sam_perturbation, sam_referenced_gradient


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
