"""Sharpness-aware perturbation and GLAD's SAM-referenced gradient, as foreach ops over parameter lists.

SAM: "Sharpness-Aware Minimization for Efficiently Improving Generalization", https://huggingface.co/papers/2010.01412.
GLAD: "Generalizable Tuning for Vision-Language Models", https://huggingface.co/papers/2507.13089 (exact rule not
public; METHODS.md §3 fixes the default):

    g       = grad L(theta)
    eps     = rho * g / ||g||                  (one global L2 norm over all trainable parameters)
    g_sam   = grad L(theta + eps)
    g_final = g + lambda * (g_sam - g)         (lambda = 0: plain training, lambda = 1: SAM)

No host synchronisation: the norm stays a device tensor.
"""

from __future__ import annotations

import torch


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of `grads` (a 0-d tensor, computed in float32)."""
    norms = torch._foreach_norm([g.float() for g in grads]) if grads else [torch.zeros(())]
    return torch.linalg.vector_norm(torch.stack(norms))


def sam_perturbation(grads: list[torch.Tensor], rho: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """Return `rho * g / ||g||` for every tensor of `grads` (global norm; zero when all gradients are zero)."""
    scale = rho / (global_grad_norm(grads) + eps)
    return torch._foreach_mul(grads, scale.to(grads[0].dtype)) if grads else []


def sam_referenced_gradient(
    grads: list[torch.Tensor], sam_grads: list[torch.Tensor], glad_lambda: float
) -> list[torch.Tensor]:
    """`g + lambda * (g_sam - g)` per tensor. With `lambda = 0` it returns `g` itself (bit for bit)."""
    if glad_lambda == 0.0:
        return list(grads)
    if glad_lambda == 1.0:
        return list(sam_grads)
    diff = torch._foreach_sub(sam_grads, grads)
    return torch._foreach_add(grads, diff, alpha=glad_lambda)
