"""GLAD's SAM-referenced gradient, as in-place foreach ops over parameter lists (docs/glad.md).

GLAD ("Generalizable Tuning for Vision-Language Models", https://huggingface.co/papers/2507.13089; the exact rule is
not public, docs/glad.md states the one implemented) trains with

    g       = grad L(theta)
    eps     = rho * g / ||g||                  (one global L2 norm over all trainable parameters)
    g_sam   = grad L(theta + eps)
    g_final = g + lambda * (g_sam - g)  =  (1 - lambda) * g + lambda * g_sam

`lambda = 0` is plain training, `lambda = 1` is SAM (https://huggingface.co/papers/2010.01412).

The trainer's step ([`regtune.regularizers.GLADRegularizer`]) holds one extra copy of the trainable parameters and
no copy of the gradients:

1. [`glad_save_and_perturb_`]: save `theta` and move the parameters to `theta + eps`, using the gradient buffers as
   scratch space; the buffers are then dropped (`param.grad = None`), so the second backward fills fresh buffers
   exactly as a plain backward does;
2. the second backward leaves `g_sam` in the fresh buffers;
3. [`glad_combine_`]: recover `g = (params - theta) / scale` from the perturbed parameters (the perturbation as
   applied), turn the buffers into `g_sam + (1 - lambda) * (g - g_sam)`, optionally compute `cos(g, g_sam)` and
   `||g_sam - g|| / ||g||`, and copy `theta` back (exactly: a copy, not a subtraction).

Parameters below float32 (bfloat16, float16) keep their `g` (see [`low_precision`]): their rounding of `theta + eps`
would lose most of `eps`.

Every reduction stays a device tensor (no host synchronisation).
"""

from __future__ import annotations

import torch

from regtune._sharding import foreach_copy_

from .sam import global_grad_norm


__all__ = [
    "glad_combine_",
    "glad_save_and_perturb_",
    "low_precision",
    "sam_referenced_gradient",
]


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


def low_precision(param: torch.Tensor) -> bool:
    """Whether GLAD keeps `g` of `param` by itself rather than recovering it from the perturbation: for parameters
    below float32 (bfloat16, float16), whose rounding of `theta + eps` would lose most of `eps`."""
    return param.dtype not in (torch.float32, torch.float64)


@torch.no_grad()
def glad_save_and_perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    rho: float,
    eps: float = 1e-12,
    keep: list[bool] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """
    Save `theta` and move `params` to `theta + rho * g / ||g||`, for a second backward into fresh gradient buffers.

    The gradient buffers are used as scratch space: where `keep` is false (the default), `grads[i]` holds the
    perturbation `eps` afterwards and is meant to be dropped (`param.grad = None`): `g` is recovered after the second
    backward from the perturbed parameters and the saved copy, `(params - saved) / scale` (see [`glad_combine_`]), so
    the step holds one copy of the parameters and none of the gradients. Where `keep` is true (parameters below
    float32, see [`low_precision`]), `grads[i]` is left holding `g` and the caller keeps it.

    Args:
        params (`list[torch.Tensor]`): the trainable parameters (their data is changed in place).
        grads (`list[torch.Tensor]`): their gradients `g` (the `.grad` tensors).
        rho (`float`): the perturbation radius (> 0).
        eps (`float`, defaults to `1e-12`): added to `||g||` (a zero gradient gives a zero perturbation).
        keep (`list[bool]`, *optional*): per parameter, whether `grads[i]` must still hold `g` afterwards.

    Returns:
        `(saved, grad_norm, scale)`: a copy of `theta`, `||g||` and `rho / (||g|| + eps)`, both 0-d float32 tensors
        on the gradients' device.
    """
    saved = [p.detach().clone() for p in params]
    grad_norm = global_grad_norm(grads)
    scale = rho / (grad_norm + eps)
    if not grads:
        return saved, grad_norm, scale
    keep = keep or [False] * len(params)
    scratch = [i for i, k in enumerate(keep) if not k]
    kept = [i for i, k in enumerate(keep) if k]
    if scratch:
        buffers = [grads[i] for i in scratch]
        torch._foreach_mul_(buffers, scale)  # the buffers hold eps
        torch._foreach_add_([params[i] for i in scratch], buffers)
    if kept:
        torch._foreach_add_([params[i] for i in kept], torch._foreach_mul([grads[i] for i in kept], scale))
    return saved, grad_norm, scale


@torch.no_grad()
def glad_combine_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    sam_grads: list[torch.Tensor],
    scale: torch.Tensor,
    glad_lambda: float,
    kept_grads: list[torch.Tensor | None] | None = None,
    grad_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """
    After the second backward: turn `sam_grads` (holding `g_sam`) into `g + lambda * (g_sam - g)` in place, restore
    `params` to `theta` exactly (a copy of `saved`), and with `grad_norm` given return the diagnostics.

    `g` is recovered from the applied perturbation, `(params - saved) / scale`, in `params` (scratch space until the
    restore), except where `kept_grads[i]` holds it. The recovered `g` carries the rounding of `theta + eps` to the
    parameters' dtype: a relative error of about `ulp(theta_i) / (2 |eps_i|)` per entry (float32 parameters: about
    `3e-8 |theta_i| / |eps_i|`).

    Args:
        params (`list[torch.Tensor]`): the perturbed parameters `theta + eps` (restored to `theta`).
        saved (`list[torch.Tensor]`): `theta`, from [`glad_save_and_perturb_`].
        sam_grads (`list[torch.Tensor]`): `g_sam` (the `.grad` tensors of the second backward; changed in place).
        scale (`torch.Tensor`): `rho / (||g|| + eps)`, from [`glad_save_and_perturb_`].
        glad_lambda (`float`): the weight of the SAM gradient, in (0, 1].
        kept_grads (`list`, *optional*): per parameter, `g` itself where it was kept, else `None`.
        grad_norm (`torch.Tensor`, *optional*): `||g||`; when given, the diagnostics are computed and returned.

    Returns:
        `None`, or with `grad_norm` `(cos, rel_diff)`: 0-d float32 tensors, `cos(g, g_sam)` (in [-1, 1]) and
        `||g_sam - g|| / ||g||`.
    """
    diagnostics = grad_norm is not None
    if sam_grads and (glad_lambda != 1.0 or diagnostics):
        kept_grads = kept_grads or [None] * len(params)
        recover = [i for i, g in enumerate(kept_grads) if g is None]
        kept = [i for i, g in enumerate(kept_grads) if g is not None]
        if recover:
            scratch = [params[i] for i in recover]
            torch._foreach_sub_(scratch, [saved[i] for i in recover])  # eps as applied
            torch._foreach_mul_(scratch, scale.reciprocal())  # g
        if kept:
            foreach_copy_([params[i] for i in kept], [kept_grads[i] for i in kept])
        if diagnostics:
            sam_norm = global_grad_norm(sam_grads)
        torch._foreach_sub_(params, sam_grads)  # g - g_sam
        if diagnostics:
            diff_norm = global_grad_norm(params)
        if glad_lambda != 1.0:
            torch._foreach_add_(sam_grads, params, alpha=1.0 - glad_lambda)  # g_sam + (1 - lambda) (g - g_sam)
    foreach_copy_(params, saved)  # exact; FSDP2's DTensor parameters too
    if not diagnostics:
        return None
    if not sam_grads:
        zero = torch.zeros(())
        return zero, zero
    tiny = torch.finfo(torch.float32).tiny
    cos = (grad_norm.square() + sam_norm.square() - diff_norm.square()) / (2 * grad_norm * sam_norm).clamp_min(tiny)
    return cos.clamp(-1.0, 1.0), diff_norm / grad_norm.clamp_min(tiny)
