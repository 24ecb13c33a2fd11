"""The math of LfU, "Learning from the Undesirable" ([paper](https://huggingface.co/papers/2511.13052), code
github.com/yunpal/LfU), as pure torch functions.

    loss    = L_sft(theta; x) + beta * L_cons
    theta~  = theta + alpha * g / ||g||_2          g = grad L_sft(theta; x'), one global L2 norm  (perturb mode)
    L_cons  = mean_l  MSE( h~_l(x)[response], stopgrad(h_l(x))[response] )

`h_l` are the hidden states of the layers in range (index 0 = the embedding output), `h~_l` the same states under the
"undesirable" update (the ascent step in perturb mode, the steering vectors in RepS mode), and `response` the tokens
whose label is not -100. RepS mode, by default, pairs the other way round, as the released code: the clean states
of `x` carry the gradient and are pulled towards the detached steered states of the ascent batch `x'` (see
[`released_reps_target`] for how those are laid onto `x`'s positions). The ascent step is
[`regtune.functional.sam.sam_perturbation`] (the same normalized step as SAM's). RepS mode steers the output of every decoder block's MLP (or, as an option, of every block):

    x -> normalize(normalize(x) + alpha * normalize(d_l)) * ||x||          (norms over the hidden dimension)

docs/lfu.md describes the method, its defaults and the decisions taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sam import sam_perturbation


IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "hidden_state_consistency",
    "released_reps_target",
    "response_token_mask",
    "sam_perturbation",
    "steer_hidden",
]


def response_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """The tokens LfU compares: those whose label is not -100 (as the released code, labels are not shifted)."""
    return labels != IGNORE_INDEX


def hidden_state_consistency(
    perturbed: Sequence[torch.Tensor], clean: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """
    LfU's consistency loss: the mean over layers of the MSE between perturbed and stop-gradient clean hidden states,
    on the masked tokens only.

    Args:
        perturbed (`Sequence[torch.Tensor]`): hidden states `(batch, seq, hidden)` of the perturbed forward, one per
            layer; the gradient flows through these.
        clean (`Sequence[torch.Tensor]`): the clean forward's hidden states, same shapes; detached here.
        mask (`torch.Tensor`): `(batch, seq)` booleans, the tokens to compare (see [`response_token_mask`]).

    Returns:
        `torch.Tensor`: a 0-d float32 tensor, `mean_l mean_{tokens in mask, features} (h~ - h)^2`; zero (still
        connected to `perturbed`) when the mask selects nothing.
    """
    if len(perturbed) != len(clean) or not perturbed:
        raise ValueError(f"need the same, non-zero number of layers, got {len(perturbed)} and {len(clean)}")
    weights = mask.to(perturbed[0].device, torch.float32).unsqueeze(-1)
    count = weights.sum().clamp(min=1.0) * perturbed[0].shape[-1]
    total = perturbed[0].new_zeros((), dtype=torch.float32)
    for h_pert, h_clean in zip(perturbed, clean):
        diff = h_pert.float() - h_clean.detach().float()
        total = total + (diff.square() * weights).sum() / count
    return total / len(perturbed)


def steer_hidden(hidden: torch.Tensor, direction: torch.Tensor, alpha: float, eps: float = 1e-12) -> torch.Tensor:
    """
    RepS steering of one hidden state: `normalize(normalize(x) + alpha * normalize(d)) * ||x||` (over the last dim).

    The direction of every token's state is pushed towards `d`; its norm is kept. Computed in float32 (as the released
    code does) and returned in `hidden`'s dtype, so a bf16 state is not rounded twice. Differentiable in `hidden` and
    `direction`.
    """
    x = hidden.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    unit = x / norm.clamp(min=eps)
    d = direction.float()
    d_unit = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp(min=eps)
    mixed = unit + alpha * d_unit
    return (mixed / torch.linalg.vector_norm(mixed, dim=-1, keepdim=True).clamp(min=eps) * norm).to(hidden.dtype)


def released_reps_target(steered: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """
    The target the released RepS trainer pulls the clean states of `x` towards: the steered states of the ascent
    batch `x'`, laid onto the positions of `x` as yunpal/LfU's `compute_mse_consistency_loss_perturb_detach` does.

    When `x'` has as many positions as `x` (and more than one), position `t` of row `i` of `x` is paired with position
    `t` of row `i` of `x'`; otherwise every position of row `i` of `x` is paired with the *last* position of row `i`
    of `x'` (broadcast over the sequence). Rows of `x'` beyond `batch_size` are dropped (regtune draws `x'` at the
    full per-device batch size, while the last batch of an epoch may be smaller).

    Args:
        steered (`torch.Tensor`): `(batch', seq', hidden)`, one hidden state of the steered forward of `x'`.
        batch_size (`int`), seq_len (`int`): the shape of `x`'s hidden states.

    Returns:
        `torch.Tensor`: `(batch_size, seq_len, hidden)`, detached.

    Raises:
        `ValueError`: when `x'` has fewer rows than `x`.
    """
    if steered.shape[0] < batch_size:
        raise ValueError(f"the ascent batch has {steered.shape[0]} rows, fewer than the training batch ({batch_size})")
    steered = steered[:batch_size].detach()
    if steered.shape[1] == 1 or steered.shape[1] != seq_len:
        steered = steered[:, -1:, :].expand(batch_size, seq_len, steered.shape[-1])
    return steered
