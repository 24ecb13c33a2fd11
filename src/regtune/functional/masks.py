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


def gradient_dropout_keep(
    grad_task: torch.Tensor, grad_knowledge: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """The Bernoulli draw of R-AMT's gradient dropout, `1[P > U]` (in `grad_task`'s dtype), with
    `P = (sign(g_a) * (g_a + g_b) / (|g_a| + |g_b| + 1e-8) + 1) / 2` (see [`gradient_dropout`])."""
    agreement = torch.sign(grad_task) * (grad_task + grad_knowledge) / (grad_task.abs() + grad_knowledge.abs() + 1e-8)
    return ((agreement + 1.0) / 2.0 > uniform).to(grad_task.dtype)


def gradient_dropout(
    grad_task: torch.Tensor,
    grad_knowledge: torch.Tensor,
    graddrop_lambda: float,
    uniform: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """R-AMT's gradient dropout: keep the task gradient where it agrees with the knowledge gradient.

    `P = (sign(g_a) * (g_a + g_b) / (|g_a| + |g_b| + 1e-8) + 1) / 2` and
    `g = ((1 - lambda) + lambda * 1[P > U]) * g_a` with `U ~ Uniform(0, 1)` elementwise. `g_b` is never applied by
    itself: it only decides, entry by entry, how likely the task gradient survives (always where both agree).

    Args:
        grad_task (`torch.Tensor`): `g_a`, gradient of the task loss (plus the score penalty).
        grad_knowledge (`torch.Tensor`): `g_b`, gradient of the knowledge loss (soft cross-entropy to the
            pre-trained model's outputs).
        graddrop_lambda (`float`): in [0, 1]; 0 returns `g_a`.
        uniform (`torch.Tensor`): `U`, same shape, uniform in [0, 1).
        keep (`torch.Tensor`, *optional*): `1[P > U]` if already computed by [`gradient_dropout_keep`].
    """
    if keep is None:
        keep = gradient_dropout_keep(grad_task, grad_knowledge, uniform)
    return ((1.0 - graddrop_lambda) + graddrop_lambda * keep) * grad_task


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """`-sum softmax(t/T) * log_softmax(s/T) * T^2`, averaged over all leading positions (R-AMT's knowledge loss)."""
    teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher * log_student).sum(dim=-1).mean() * temperature**2
