"""GLAD's SAM-referenced gradient, as in-place foreach ops over parameter lists (docs/glad.md).

GLAD ("Generalizable Tuning for Vision-Language Models", https://huggingface.co/papers/2507.13089; the exact rule is
not public, docs/glad.md states the one implemented) trains with

    g       = grad L(theta)
    eps     = rho * g / ||g||                  (one global L2 norm over all trainable parameters)
    g_sam   = grad L(theta + eps)
    g_final = g + lambda * (g_sam - g)  =  (1 - lambda) * g + lambda * g_sam

`lambda = 0` is plain training, `lambda = 1` is SAM (https://huggingface.co/papers/2010.01412).

The step holds one extra copy of the trainable parameters and no extra copy of the gradients:

1. [`glad_perturb_`]: save `theta`, move the parameters to `theta + eps` and rescale the gradient buffers in place to
   `c * g`, with `c = (1 - lambda) / lambda`;
2. the second backward accumulates `g_sam` on top: the buffers hold `h = c * g + g_sam`;
3. [`glad_diagnostics_`] (optional) recovers `cos(g, g_sam)` and `||g_sam - g|| / ||g||` from `h`, the perturbation
   and `||g||`, using the perturbed parameters as scratch space;
4. [`glad_restore_`]: copy `theta` back (exactly) and multiply the buffers by `lambda`:
   `lambda * (c * g + g_sam) = (1 - lambda) * g + lambda * g_sam`.

Every reduction stays a device tensor (no host synchronisation).
"""

from __future__ import annotations

import torch

from regtune._sharding import foreach_copy_

from .sam import global_grad_norm


__all__ = ["glad_diagnostics_", "glad_perturb_", "glad_restore_", "sam_referenced_gradient"]


def sam_referenced_gradient(
    grads: list[torch.Tensor], sam_grads: list[torch.Tensor], glad_lambda: float
) -> list[torch.Tensor]:
    """`g + lambda * (g_sam - g)` per tensor, out of place (a reference form; the trainer uses the in-place steps).
    With `lambda = 0` it returns `g` itself (bit for bit), with `lambda = 1` `g_sam` itself."""
    if glad_lambda == 0.0:
        return list(grads)
    if glad_lambda == 1.0:
        return list(sam_grads)
    diff = torch._foreach_sub(sam_grads, grads)
    return torch._foreach_add(grads, diff, alpha=glad_lambda)


@torch.no_grad()
def glad_perturb_(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, glad_lambda: float, eps: float = 1e-12
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """
    Move `params` from `theta` to `theta + rho * g / ||g||` and rescale `grads` (holding `g`) to
    `(1 - lambda) / lambda * g`, in place, so that a second backward accumulates `g_sam` on top of them.

    Args:
        params (`list[torch.Tensor]`): the trainable parameters (their data is changed in place).
        grads (`list[torch.Tensor]`): their gradients `g` (the `.grad` tensors, changed in place).
        rho (`float`): the perturbation radius (> 0).
        glad_lambda (`float`): the weight of the SAM gradient, in (0, 1].
        eps (`float`, defaults to `1e-12`): added to `||g||` (a zero gradient gives a zero perturbation).

    Returns:
        `(saved, grad_norm, scale)`: a copy of `theta` (the only extra memory: one copy of the parameters), `||g||`
        and `rho / (||g|| + eps)`, both 0-d float32 tensors on the gradients' device.
    """
    if not 0.0 < glad_lambda <= 1.0:
        raise ValueError(f"`glad_lambda` must be in (0, 1] for the perturbed pass, got {glad_lambda!r}.")
    saved = [p.detach().clone() for p in params]
    grad_norm = global_grad_norm(grads)
    scale = rho / (grad_norm + eps)
    if not grads:
        return saved, grad_norm, scale
    torch._foreach_mul_(grads, scale)  # grads hold eps
    torch._foreach_add_(params, grads)
    if glad_lambda == 1.0:
        torch._foreach_zero_(grads)
    else:
        torch._foreach_mul_(grads, ((1.0 - glad_lambda) / glad_lambda) / scale)
    return saved, grad_norm, scale


@torch.no_grad()
def glad_diagnostics_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    grads: list[torch.Tensor],
    grad_norm: torch.Tensor,
    scale: torch.Tensor,
    glad_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `cos(g, g_sam)` and `||g_sam - g|| / ||g||` after the second backward, without extra memory: `params` (at
    `theta + eps`) are used as scratch space and hold garbage afterwards, so call [`glad_restore_`] next.

    `g` is recovered from the applied perturbation, `(params - saved) / scale`, so the figures describe the
    perturbation as rounded to the parameters' dtype (exact up to float32 rounding for float32 parameters).

    Args:
        params (`list[torch.Tensor]`): the perturbed parameters `theta + eps` (overwritten).
        saved (`list[torch.Tensor]`): `theta`, as returned by [`glad_perturb_`].
        grads (`list[torch.Tensor]`): `h = c * g + g_sam` (unchanged).
        grad_norm (`torch.Tensor`): `||g||`; scale (`torch.Tensor`): `rho / (||g|| + eps)`, from [`glad_perturb_`].
        glad_lambda (`float`): in (0, 1].

    Returns:
        `(cos, rel_diff)`: 0-d float32 tensors, `cos(g, g_sam)` (in [-1, 1]) and `||g_sam - g|| / ||g||`.
    """
    if not grads:
        zero = torch.zeros(())
        return zero, zero
    torch._foreach_sub_(params, saved)  # eps
    torch._foreach_mul_(params, 1.0 / (scale * glad_lambda))  # g / lambda = (1 + c) g
    torch._foreach_sub_(params, grads)  # (1 + c) g - (c g + g_sam) = g - g_sam
    diff_norm = global_grad_norm(params)
    torch._foreach_mul_(params, -(1.0 - glad_lambda))
    torch._foreach_add_(params, grads, alpha=glad_lambda)  # lambda h - (1 - lambda)(g - g_sam) = g_sam
    sam_norm = global_grad_norm(params)
    tiny = torch.finfo(torch.float32).tiny
    cos = (grad_norm.square() + sam_norm.square() - diff_norm.square()) / (2 * grad_norm * sam_norm).clamp_min(tiny)
    return cos.clamp(-1.0, 1.0), diff_norm / grad_norm.clamp_min(tiny)


@torch.no_grad()
def glad_restore_(
    params: list[torch.Tensor], saved: list[torch.Tensor], grads: list[torch.Tensor], glad_lambda: float
) -> None:
    """Copy `theta` back into `params` (exactly) and turn `grads` from `c * g + g_sam` into
    `(1 - lambda) * g + lambda * g_sam`, in place."""
    foreach_copy_(params, saved)  # exact; FSDP2's DTensor parameters too
    if grads and glad_lambda != 1.0:
        torch._foreach_mul_(grads, glad_lambda)
