"""Binary masks over frozen weights (R-AMT): straight-through binarization, score penalty, bit packing.

"Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models",
https://huggingface.co/papers/2307.15049 (code: github.com/wuw2019/R-AMT).
"""

from __future__ import annotations

import torch


def straight_through_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """`M = 1[S > threshold]` in the forward; `dL/dS := dL/dM` in the backward (straight-through estimator).

    The forward value is exactly the hard mask (`hard + (S - S.detach())` adds an exact zero).
    """
    hard = (scores > threshold).to(scores.dtype)
    return hard + (scores - scores.detach())


def score_penalty(scores: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the score tensors of their (unsquared) L2 norm, `sum_l ||S_l||_2` (R-AMT's regularizer)."""
    return torch.stack(torch._foreach_norm(scores)).sum()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into a flat `uint8` tensor, 8 entries per byte (big-endian bit order, zero padded)."""
    bits = mask.detach().flatten().to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of [`pack_mask`]: a boolean tensor of `shape`."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.to(torch.uint8)[:, None] >> shifts) & 1
    numel = 1
    for size in shape:
        numel *= size
    return bits.flatten()[:numel].view(shape).bool()
