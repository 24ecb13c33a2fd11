"""ALLoRA's row coefficient and the autograd functions that apply it.

ALLoRA: "Adaptive Learning Rate Mitigates LoRA Fatal Flaws", https://huggingface.co/papers/2410.09692.

Forward: `h = B A x` (no dropout, no alpha/r scaling; the base output `W x` is added by the caller).
Backward: the gradients reaching `A` and `B` are those of plain LoRA with the output gradient `delta` replaced by
`delta * c` (per output row `i` of `dW = B A`), where

    c_i = 1 / sqrt(||dW_i||^2 + 1 / eta^2)          (squared norm by default; `norm_squared=False` drops the square)

so `grad_B = c[:, None] * (delta^T (A x))` and `grad_A = (delta (c[:, None] * B))^T x`. The gradient flowing to
the input `x` (and so to earlier layers) is plain LoRA's, unscaled. Equivalently, in weight space: with `G` the
gradient of the loss with respect to `dW`, `grad_B = (c * G) A^T` and `grad_A = B^T (c * G)`.

The "factors" reading (`row_norm="factors"`) instead gives every row of `A` and of `B` its own coefficient from that
row's own norm, `1 / sqrt(||A_k||^2 + 1/eta^2)` and `1 / sqrt(||B_i||^2 + 1/eta^2)`, and scales that row's gradient.
"""

from __future__ import annotations

import torch


def allora_row_coefficient(
    lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, norm_squared: bool = True
) -> torch.Tensor:
    """Return `c_i = 1 / sqrt(||(B A)_i||^p + 1/eta^2)` for every output row `i` (`p = 2`, or 1 if not squared).

    `||(B A)_i||^2 = B_i (A A^T) B_i^T` is computed through the `r x r` Gram matrix, so `B A` (out x in) is never
    formed. Computed in float32 whatever the parameter dtype. Leading dimensions are batch dimensions (one product
    `B_e A_e` per expert, for example).

    Args:
        lora_A (`torch.Tensor`): `A`, shape `(..., r, in_features)`.
        lora_B (`torch.Tensor`): `B`, shape `(..., out_features, r)`.
        eta (`float`): the coefficient at `dW = 0` (`c_i = eta`), > 0.
        norm_squared (`bool`, defaults to `True`): use `||dW_i||^2` (default) or the unsquared `||dW_i||`.

    Returns:
        `torch.Tensor`: float32, shape `(..., out_features)`.
    """
    row_sq = allora_row_norms_squared(lora_A, lora_B).clamp_min(0.0)
    norm_term = row_sq if norm_squared else row_sq.sqrt()
    return torch.rsqrt(norm_term + 1.0 / (eta * eta))


def allora_row_norms_squared(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """`||(B A)_i||^2` for every output row `i`, through the `r x r` Gram matrix (float32, detached; leading
    dimensions are batch dimensions). Not clamped: rounding can make a zero row slightly negative."""
    a = lora_A.detach() if lora_A.requires_grad else lora_A
    b = lora_B.detach() if lora_B.requires_grad else lora_B
    if a.dtype != torch.float32:
        a = a.float()
    if b.dtype != torch.float32:
        b = b.float()
    return torch.linalg.vecdot(b @ (a @ a.mT), b)


def allora_row_coefficients_from_norms_(
    norms: list[torch.Tensor], etas: list[float], norm_squared: list[bool]
) -> list[torch.Tensor]:
    """
    In place, for several tensors at once (one `torch._foreach_*` call per step of the formula, whatever their
    number): turn the squared row norms `norms[k]` (from [`allora_row_norms_squared`]) into the row coefficients
    `1 / sqrt(max(norms[k], 0)^(p/2) + 1/etas[k]^2)`, `p = 2` where `norm_squared[k]`, else 1. The values are those of
    [`allora_row_coefficient`]. Plain (unsharded) tensors only.

    Returns:
        `list[torch.Tensor]`: `norms`, now holding the coefficients.
    """
    torch._foreach_clamp_min_(norms, 0.0)
    roots = [n for n, squared in zip(norms, norm_squared) if not squared]
    if roots:
        torch._foreach_sqrt_(roots)
    torch._foreach_add_(norms, [1.0 / (eta * eta) for eta in etas])
    torch._foreach_rsqrt_(norms)
    return norms


def allora_factor_coefficient(weight: torch.Tensor, eta: float, norm_squared: bool = True) -> torch.Tensor:
    """Return `1 / sqrt(||w_k||^p + 1/eta^2)` for every row `k` of a factor (the "factors" reading of ALLoRA).

    Args:
        weight (`torch.Tensor`): a factor, shape `(rows, ...)`; every slice `weight[k]` is one row.
        eta (`float`): ALLoRA's `eta` (> 0).
        norm_squared (`bool`, defaults to `True`): use the squared row norm (default) or the row norm.

    Returns:
        `torch.Tensor`: float32, shape `(rows,)`.
    """
    row_sq = weight.detach().float().reshape(weight.shape[0], -1).pow(2).sum(dim=1)
    norm_term = row_sq if norm_squared else row_sq.sqrt()
    return torch.rsqrt(norm_term + 1.0 / (eta * eta))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale` (broadcast to the input's shape)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_grad(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return `x` unchanged; its gradient is multiplied by `scale` (any shape that broadcasts to `x`'s).

    Args:
        x (`torch.Tensor`): the tensor whose gradient is scaled.
        scale (`torch.Tensor`): the scale (not differentiated).
    """
    return _ScaleGrad.apply(x, scale)


class _ALLoRAProduct(torch.autograd.Function):
    """`B A x` whose backward scales the gradients of `A` and `B` by the row coefficient `c` (not that of `x`).

    `factors` (optional) is `[B | c[:, None] * B]` (out x 2r), which depends on the weights only: the layers compute
    it with the coefficient, once per optimizer step, so that the backward does one product with it for both the
    plain gradient path to `x` and the scaled one to `A`.
    """

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, coefficient, factors=None):
        hidden = torch.nn.functional.linear(x, weight_A)
        ctx.save_for_backward(x, hidden, weight_A, weight_B, coefficient, factors)
        return torch.nn.functional.linear(hidden, weight_B)

    @staticmethod
    def backward(ctx, grad_out):
        # runs for every adapted layer and micro-batch: kept to four products and one scaling
        x, hidden, weight_A, weight_B, coefficient, factors = ctx.saved_tensors
        dtype = grad_out.dtype
        needs_x, needs_A, needs_B = ctx.needs_input_grad[:3]
        r = weight_A.shape[0]
        c = coefficient if coefficient.dtype == dtype else coefficient.to(dtype)
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_A = grad_B = None
        if needs_x or needs_A:
            if factors is None:
                b = weight_B if weight_B.dtype == dtype else weight_B.to(dtype)
                factors = torch.cat([b, b * c[:, None]], dim=1)
            elif factors.dtype != dtype:
                factors = factors.to(dtype)
            # [delta B | delta (c B)]: delta * c through B is delta (c[:, None] * B), the small matrix scaled, not the
            # activations
            through_B = grad_out_2d @ factors
            if needs_x:  # plain LoRA: dL/dx = (delta B) A
                a = weight_A if weight_A.dtype == dtype else weight_A.to(dtype)
                grad_x = (through_B[:, :r] @ a).view(*x.shape[:-1], a.shape[-1])
                if grad_x.dtype != x.dtype:
                    grad_x = grad_x.to(x.dtype)
            if needs_A:
                x_2d = x.reshape(-1, x.shape[-1])
                grad_A = through_B[:, r:].T @ (x_2d if x_2d.dtype == dtype else x_2d.to(dtype))
                if grad_A.dtype != weight_A.dtype:
                    grad_A = grad_A.to(weight_A.dtype)
        if needs_B:
            hidden_2d = hidden.reshape(-1, hidden.shape[-1])
            grad_B = (grad_out_2d.T @ (hidden_2d if hidden_2d.dtype == dtype else hidden_2d.to(dtype))).mul_(
                c[:, None]
            )
            if grad_B.dtype != weight_B.dtype:
                grad_B = grad_B.to(weight_B.dtype)
        return grad_x, grad_A, grad_B, None, None


def allora_lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    eta: float,
    norm_squared: bool = True,
    coefficient: torch.Tensor | None = None,
) -> torch.Tensor:
    """`B A x` with ALLoRA's backward: gradients to `A`/`B` scaled per output row, gradient to `x` unscaled.

    Args:
        x (`torch.Tensor`): input of shape `(..., in_features)`.
        lora_A (`torch.Tensor`): `(r, in_features)`.
        lora_B (`torch.Tensor`): `(out_features, r)`.
        eta (`float`): ALLoRA's `eta` (> 0).
        norm_squared (`bool`, defaults to `True`): see [`allora_row_coefficient`].
        coefficient (`torch.Tensor`, *optional*): the row coefficient, if already computed from `lora_A` and
            `lora_B` (the layers cache it between optimizer steps); computed here otherwise.
    """
    if coefficient is None:
        coefficient = allora_row_coefficient(lora_A, lora_B, eta, norm_squared)
    return _ALLoRAProduct.apply(x, lora_A, lora_B, coefficient)


class _ALLoRAPointwiseB(torch.autograd.Function):
    """The `B` half of a conv LoRA (`B` a 1x1 convolution, possibly grouped) with ALLoRA's split backward.

    `hidden_x` and `hidden_A` hold the same value `A * x`; `hidden_x` carries the gradient path to `x`, `hidden_A`
    the one to `A`. The forward computes `B * hidden_x`. The backward returns the plain gradient to `hidden_x`, and
    the gradients to `hidden_A` and `B` computed with the output gradient scaled per output channel by `c`.
    """

    @staticmethod
    def forward(ctx, hidden_x, hidden_A, weight_B, coefficient, groups):
        out = _pointwise(hidden_x, weight_B, groups)
        ctx.groups = groups
        ctx.save_for_backward(hidden_x, weight_B, coefficient)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight_B, coefficient = ctx.saved_tensors
        groups = ctx.groups
        n, out_ch = grad_out.shape[0], grad_out.shape[1]
        r = hidden.shape[1]
        dtype = grad_out.dtype
        # (n, groups, out/groups, L) and (groups, out/groups, r/groups)
        delta = grad_out.reshape(n, groups, out_ch // groups, -1)
        b = weight_B.to(dtype).reshape(groups, out_ch // groups, r // groups)
        c = coefficient.to(dtype).reshape(1, groups, out_ch // groups, 1)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.einsum("ngol,gok->ngkl", delta, b).reshape(hidden.shape).to(hidden.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            scaled = delta * c
            if ctx.needs_input_grad[1]:
                grad_A = torch.einsum("ngol,gok->ngkl", scaled, b).reshape(hidden.shape).to(hidden.dtype)
            if ctx.needs_input_grad[2]:
                h = hidden.to(dtype).reshape(n, groups, r // groups, -1)
                grad_B = torch.einsum("ngol,ngkl->gok", scaled, h).reshape(weight_B.shape).to(weight_B.dtype)
        return grad_x, grad_A, grad_B, None, None


def _pointwise(hidden: torch.Tensor, weight_B: torch.Tensor, groups: int) -> torch.Tensor:
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[hidden.dim()]
    return conv(hidden, weight_B, groups=groups)


def allora_conv_forward(
    x: torch.Tensor,
    conv_A,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    coefficient: torch.Tensor,
    groups: int = 1,
) -> torch.Tensor:
    """`B * (A * x)` for a conv LoRA (`A` a convolution, `B` a 1x1 convolution) with ALLoRA's backward.

    The gradients to `A` and `B` are plain LoRA's with the output gradient scaled per output channel by
    `coefficient`; the gradient to `x` is plain LoRA's. When `x` needs a gradient, `A * x` is computed twice (once
    for each gradient path), which is the price of keeping the two paths apart without re-implementing the
    convolution's backward.

    Args:
        x (`torch.Tensor`): input `(N, C_in, *spatial)`.
        conv_A (`Callable`): `conv_A(x, weight)` computes `A * x` (e.g. `lora_A._conv_forward(x, w, None)`).
        weight_A (`torch.Tensor`): the weight of `A`.
        weight_B (`torch.Tensor`): the weight of `B`, `(C_out, r / groups, 1, ...)`.
        coefficient (`torch.Tensor`): `(C_out,)`, the row coefficient of every output channel.
        groups (`int`, defaults to 1): the groups of `B`.
    """
    hidden_A = conv_A(x.detach(), weight_A)
    if x.requires_grad:
        hidden_x = conv_A(x, weight_A.detach())
    else:
        hidden_x = hidden_A.detach()
    return _ALLoRAPointwiseB.apply(hidden_x, hidden_A, weight_B, coefficient, groups)
