"""Sharpness-aware perturbation, as foreach ops over parameter lists (shared by GLAD and LfU's ascent step).

SAM: "Sharpness-Aware Minimization for Efficiently Improving Generalization", https://huggingface.co/papers/2010.01412:

    eps = rho * g / ||g||                      (one global L2 norm over all trainable parameters)

GLAD's combination of the plain and the perturbed gradient lives in [`regtune.functional.glad`] (which imports this
module, never the other way round). No host synchronisation: the norm stays a device tensor.
"""

from __future__ import annotations

import torch


__all__ = ["global_grad_norm", "sam_perturbation"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of `grads` (a 0-d tensor, computed in float32)."""
    # accumulated in float32 without a float32 copy of low-precision gradients
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32) if grads else [torch.zeros(())]
    return torch.linalg.vector_norm(torch.stack(norms))


def sam_perturbation(grads: list[torch.Tensor], rho: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """Return `rho * g / ||g||` for every tensor of `grads` (global norm; zero when all gradients are zero)."""
    scale = rho / (global_grad_norm(grads) + eps)
    return torch._foreach_mul(grads, scale.to(grads[0].dtype)) if grads else []
