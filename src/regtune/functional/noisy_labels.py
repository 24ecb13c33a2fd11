"""The math of two learning-with-noisy-labels regularizers, as pure torch functions.

**ELR** -- early-learning regularization (Liu et al., NeurIPS 2020, "Early-Learning Regularization Prevents
Memorization of Noisy Labels", https://arxiv.org/abs/2007.00151; code github.com/shengliu66/ELR, `ELR/model/loss.py`):

    p_i   = clamp(softmax(z_i), 1e-4, 1 - 1e-4)
    t_i  <- beta * t_i + (1 - beta) * p_i.detach() / sum_c p_ic.detach()      (per-example EMA, t starts at 0)
    L     = CE(z, y) + lambda * mean_i log(1 - <t_i, p_i>)

The gradient flows only through `p_i` in the penalty; `t_i` is updated with this step's prediction *before* the
penalty is computed (as in the released code).

**PS-KD** -- progressive self-knowledge distillation (Kim et al., ICCV 2021, "Self-Knowledge Distillation with
Progressive Refinement of Targets", https://arxiv.org/abs/2006.12000; code github.com/lgcnsai/PS-KD-Pytorch,
`main.py` and `loss/pskd_loss.py`):

    alpha_t = alpha_T * (epoch + 1) / total_epochs               (epoch counted from 0)
    soft_i  = (1 - alpha_t) * onehot(y_i) + alpha_t * P_prev[i]   (P_prev: the softmax recorded for i in the previous
                                                                   epoch's training forward; onehot(y_i) before it)
    L       = mean_i sum_c -soft_ic * log_softmax(z_i)_c

docs/noisy_labels.md describes both methods, their defaults and the decisions taken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


ELR_CLAMP = 1e-4
"""The released code clamps the softmax to [1e-4, 1 - 1e-4] before both the EMA and the penalty."""

__all__ = [
    "ELR_CLAMP",
    "clamped_softmax",
    "elr_ema_update",
    "elr_penalty",
    "elr_sigmoid_rampup",
    "pskd_alpha",
    "pskd_soft_targets",
    "soft_cross_entropy",
]


def clamped_softmax(logits: torch.Tensor, eps: float = ELR_CLAMP) -> torch.Tensor:
    """`clamp(softmax(logits, -1), eps, 1 - eps)` in float32 (ELR's `y_pred`)."""
    return F.softmax(logits.float(), dim=-1).clamp(eps, 1.0 - eps)


def elr_ema_update(previous: torch.Tensor, probs: torch.Tensor, beta: float) -> torch.Tensor:
    """
    ELR's temporal ensembling of one batch: `beta * previous + (1 - beta) * q / q.sum(-1)`, `q = probs.detach()`.

    Args:
        previous (`torch.Tensor`): the targets `t_i` of the batch's examples, shape `(B, C)` (zeros before the first
            visit).
        probs (`torch.Tensor`): the clamped softmax of the batch, shape `(B, C)` (detached here).
        beta (`float`): the EMA momentum in [0, 1).

    Returns:
        `torch.Tensor`: the new targets, shape `(B, C)`, no gradient.
    """
    q = probs.detach().float()
    return beta * previous.to(q.dtype) + (1.0 - beta) * (q / q.sum(dim=-1, keepdim=True))


def elr_penalty(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """
    `mean_i log(1 - <t_i, p_i>)` (ELR's regularizer, without its weight lambda); the gradient flows through `probs`.

    It is negative and decreasing in `<t_i, p_i>`: minimizing it pulls the prediction towards the running target.
    """
    return torch.log(1.0 - (targets.detach().to(probs.dtype) * probs).sum(dim=-1)).mean()


def elr_sigmoid_rampup(step: float, rampup_length: float) -> float:
    """
    ELR+'s ramp-up of lambda (`ELR_plus/utils/util.py::sigmoid_rampup`): `exp(-5 (1 - min(step, L) / L)^2)`, 1 when
    `rampup_length` is 0 (the released configs' `coef_step: 0`).
    """
    if rampup_length <= 0:
        return 1.0
    current = min(max(float(step), 0.0), float(rampup_length))
    phase = 1.0 - current / rampup_length
    return float(torch.exp(torch.tensor(-5.0 * phase * phase, dtype=torch.float64)))


def pskd_alpha(alpha_T: float, epoch: int, total_epochs: int) -> float:  # noqa: N803 - the paper's name
    """`alpha_T * (epoch + 1) / total_epochs` (epoch from 0; the released `main.py`), clipped below at 0."""
    return max(0.0, alpha_T * (epoch + 1) / total_epochs)


def pskd_soft_targets(labels: torch.Tensor, previous: torch.Tensor, alpha: float, num_classes: int) -> torch.Tensor:
    """`(1 - alpha) * onehot(labels) + alpha * previous` (PS-KD's targets), shape `(B, C)`, float32, no gradient."""
    onehot = F.one_hot(labels.long(), num_classes).float()
    return (1.0 - alpha) * onehot + alpha * previous.detach().float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mean_i sum_c -targets_ic * log_softmax(logits_i)_c` (PS-KD's `Custom_CrossEntropy_PSKD`), in float32."""
    return (-targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
