"""ALLoRA's row coefficient and its gradient-scaled LoRA product.

ALLoRA: "Adaptive Learning Rate Mitigates LoRA Fatal Flaws", https://huggingface.co/papers/2410.09692.

Forward: `h = B A x` (no dropout, no alpha/r scaling; the base output `W x` is added by the caller).
Backward: the gradients reaching `A` and `B` are those of plain LoRA with the output gradient `delta` replaced by
`delta * c` (per output row `i` of `dW = B A`), where

    c_i = 1 / sqrt(||dW_i||^2 + 1 / eta^2)          (squared norm, METHODS.md §1 ambiguity a)

so `grad_B = c[:, None] * (delta^T (A x))` and `grad_A = (delta (c[:, None] * B))^T x`. The gradient flowing to
the input `x` (and so to earlier layers) is plain LoRA's, unscaled.
"""

from __future__ import annotations

import torch


def allora_row_coefficient(
    lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, norm_squared: bool = True
) -> torch.Tensor:
    """Return `c_i = 1 / sqrt(||(B A)_i||^p + 1/eta^2)` for every output row `i` (`p = 2`, or 1 if not squared).

    `||(B A)_i||^2 = B_i (A A^T) B_i^T` is computed through the `r x r` Gram matrix, so `B A` (out x in) is never
    formed. Computed in float32 whatever the parameter dtype.

    Args:
        lora_A (`torch.Tensor`): `A`, shape `(r, in_features)`.
        lora_B (`torch.Tensor`): `B`, shape `(out_features, r)`.
        eta (`float`): the coefficient at `dW = 0` (`c_i = eta`), > 0.
        norm_squared (`bool`, defaults to `True`): use `||dW_i||^2` (default) or the unsquared `||dW_i||`.
    """
    a = lora_A.detach().float()
    b = lora_B.detach().float()
    row_sq = ((b @ (a @ a.T)) * b).sum(dim=1).clamp_min(0.0)
    norm_term = row_sq if norm_squared else row_sq.sqrt()
    return torch.rsqrt(norm_term + 1.0 / (eta * eta))


class _ALLoRAProduct(torch.autograd.Function):
    """`B A x` whose backward scales the gradients of `A` and `B` by the row coefficient `c` (not that of `x`)."""

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, coefficient):
        hidden = torch.nn.functional.linear(x, weight_A)
        out = torch.nn.functional.linear(hidden, weight_B)
        ctx.save_for_backward(x, hidden, weight_A, weight_B, coefficient)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, weight_A, weight_B, coefficient = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        b = weight_B.to(dtype)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            # plain LoRA: dL/dx = (delta B) A
            grad_x = ((grad_out @ b) @ weight_A.to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # delta * c through B is (delta) (c[:, None] * B): scale the small (out x r) matrix, not the activations
            scaled_b = b * coefficient.to(dtype)[:, None]
            grad_A = ((grad_out_2d @ scaled_b).T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight_A.dtype)
        if ctx.needs_input_grad[2]:
            plain_grad_B = grad_out_2d.T @ hidden.reshape(-1, hidden.shape[-1]).to(dtype)
            grad_B = (plain_grad_B * coefficient.to(dtype)[:, None]).to(weight_B.dtype)
        return grad_x, grad_A, grad_B, None


def allora_lora_forward(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, norm_squared: bool = True
) -> torch.Tensor:
    """`B A x` with ALLoRA's backward: gradients to `A`/`B` scaled per output row, gradient to `x` unscaled.

    Args:
        x (`torch.Tensor`): input of shape `(..., in_features)`.
        lora_A (`torch.Tensor`): `(r, in_features)`.
        lora_B (`torch.Tensor`): `(out_features, r)`.
        eta (`float`): ALLoRA's `eta` (> 0).
        norm_squared (`bool`, defaults to `True`): see [`allora_row_coefficient`].
    """
    coefficient = allora_row_coefficient(lora_A, lora_B, eta, norm_squared)
    return _ALLoRAProduct.apply(x, lora_A, lora_B, coefficient)
