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
    return apply_gradient_dropout_(grad_task.clone(), keep, graddrop_lambda)


def apply_gradient_dropout_(grad_task: torch.Tensor, keep: torch.Tensor, graddrop_lambda: float) -> torch.Tensor:
    """`g_a *= (1 - lambda) + lambda * keep` in place (the last step of [`gradient_dropout`]); returns `grad_task`.
    `keep` (boolean or 0/1) is the Bernoulli draw `1[P > U]`."""
    return grad_task.mul_(keep.to(grad_task.dtype).mul_(graddrop_lambda).add_(1.0 - graddrop_lambda))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """`-sum softmax(t/T) * log_softmax(s/T) * T^2`, averaged over all leading positions (R-AMT's knowledge loss)."""
    teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher * log_student).sum(dim=-1).mean() * temperature**2


# logits entries per chunk of the closed-form knowledge gradient (bounds its temporaries to a few MiB)
_KNOWLEDGE_CHUNK = 1 << 16


@torch.no_grad()
def knowledge_logit_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, scale: float, with_loss: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The gradient of `scale * soft_cross_entropy(student, teacher, temperature)` with respect to the student's logits,
    in closed form, and the loss itself: `scale * T / N * (softmax(s / T) * sum(p) - p)` per row, with
    `p = softmax(t / T)` and `N` the number of rows (all leading positions), computed in float32 as
    [`soft_cross_entropy`] is, by chunks of rows. It replaces building the loss's autograd
    graph (which keeps the teacher's softmax and the student's log-softmax, two logits-sized float32 tensors, until
    its backward). The gradient is written into `teacher` when it has the student's dtype (the teacher's logits
    are not needed afterwards), else into a new tensor of the student's dtype.

    Returns:
        `(grad, loss)`: `grad` has `student`'s shape and dtype; `loss` (the unscaled soft cross-entropy, a 0-d
        float32 tensor) is `None` unless `with_loss`.
    """
    vocab = student.shape[-1]
    rows = student.numel() // max(vocab, 1)
    if teacher.dtype == student.dtype and teacher.is_contiguous() and teacher.shape == student.shape:
        out = teacher
    else:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    flat_student, flat_teacher, flat_out = (
        student.reshape(rows, vocab),
        teacher.reshape(rows, vocab),
        out.view(rows, vocab),
    )
    total = torch.zeros((), dtype=torch.float32, device=student.device) if with_loss else None
    factor = temperature / rows * scale
    step = max(1, _KNOWLEDGE_CHUNK // max(vocab, 1))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        log_student = torch.log_softmax(flat_student[part].float() / temperature, dim=-1)
        target = torch.softmax(flat_teacher[part].float() / temperature, dim=-1)
        if with_loss:
            total += torch.dot(target.view(-1), log_student.view(-1))  # no product temporary
        grad = log_student.exp_()  # softmax(s / T)
        grad.mul_(target.sum(dim=-1, keepdim=True)).sub_(target).mul_(factor)
        flat_out[part].copy_(grad)
    loss = -total / rows * temperature**2 if with_loss else None
    return out, loss


def gradient_dropout_keep_(
    grad_task: torch.Tensor, grad_knowledge: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """[`gradient_dropout_keep`] as a boolean tensor, computed in place in `grad_knowledge`
    (overwritten): the same operations in the same order, so the same draws, with about two temporaries fewer."""
    denominator = grad_task.abs()
    denominator.add_(grad_knowledge.abs()).add_(1e-8)
    agreement = grad_knowledge.add_(grad_task).mul_(torch.sign(grad_task)).div_(denominator)
    del denominator
    return agreement.add_(1.0).div_(2.0) > uniform
