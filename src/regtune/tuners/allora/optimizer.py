"""ALLoRA's row coefficient applied to the optimizer *update* instead of the gradient (METHODS.md §1 ambiguity b).

Under Adam a slowly varying per-row gradient scale is largely normalized away, so the gradient-side reading may
carry little of the paper's effect. This optimizer factory, in the style of `peft.optimizers.create_loraplus_optimizer`,
scales what the optimizer does to each row instead:

    B_i <- B_i + c_i * (step_i)          (c_i: ALLoRA's coefficient of output row i, from the weights before the step)
    A   <- A   + mean_i(c_i) * (step)    (A has no output rows; its rows mix all of them, so it gets the layer mean)

where `step` is what the wrapped optimizer would have done (including decoupled weight decay, which is scaled too).
Both `c` and the mean equal `eta` at `dW = 0`.
"""

from __future__ import annotations

import torch
from torch import nn

from regtune.functional.allora import allora_row_coefficient

from .layer import ALLoRALinear


def _allora_layers(model: nn.Module):
    for module in model.modules():
        if isinstance(module, ALLoRALinear):
            for name in module.lora_A.keys():
                if name in module.allora_eta:
                    yield module, name


def create_allora_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, **kwargs
) -> torch.optim.Optimizer:
    """
    Create an optimizer that applies ALLoRA's row coefficient to the parameter update.

    The ALLoRA adapters of `model` must use `coefficient_on="update"` (their layers then compute plain gradients);
    any other trainable parameter is optimized normally by `optimizer_cls`.

    Args:
        model (`torch.nn.Module`): a peft model with ALLoRA adapters.
        optimizer_cls (`type[torch.optim.Optimizer]`): e.g. `torch.optim.AdamW`.
        lr (`float`): learning rate.
        **kwargs: passed on to `optimizer_cls`.

    Returns:
        `torch.optim.Optimizer`: an `optimizer_cls` instance with a step post-hook that rescales the update.

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.ALLoRAConfig(r=8, coefficient_on="update"))
        >>> optimizer = regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=1e-3)
        >>> trainer = transformers.Trainer(model=model, optimizers=(optimizer, None), ...)
        ```
    """
    triples = []  # (A, B, eta, norm_squared) of every trainable ALLoRA adapter
    for module, name in _allora_layers(model):
        if module.allora_scale_gradients[name]:
            raise ValueError(
                f"create_allora_optimizer: adapter '{name}' has coefficient_on='gradient', so its gradients are "
                "already scaled; scaling the update too would apply the coefficient twice. Build the model with "
                "ALLoRAConfig(coefficient_on='update')."
            )
        weight_A, weight_B = module.lora_A[name].weight, module.lora_B[name].weight
        if weight_A.requires_grad or weight_B.requires_grad:
            triples.append((weight_A, weight_B, module.allora_eta[name], module.allora_norm_squared[name]))
    if not triples:
        raise ValueError("create_allora_optimizer: the model has no trainable ALLoRA adapter.")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, lr=lr, **kwargs)
    scaled = [p for a, b, _, _ in triples for p in (a, b)]
    snapshot: list[torch.Tensor] = []
    row_coefficients: list[torch.Tensor] = []

    def pre_step(opt, args, kw):
        snapshot.clear()
        snapshot.extend(torch._foreach_mul(scaled, 1.0))  # copies of A, B before the step
        row_coefficients.clear()
        for weight_A, weight_B, eta, squared in triples:
            c = allora_row_coefficient(weight_A, weight_B, eta, squared)
            row_coefficients.append(c.mean().to(weight_A.dtype).reshape(1, 1))
            row_coefficients.append(c.to(weight_B.dtype)[:, None])

    @torch.no_grad()
    def post_step(opt, args, kw):
        # p <- p_old + c * (p_new - p_old)
        step = torch._foreach_sub(scaled, snapshot)
        torch._foreach_mul_(step, row_coefficients)
        torch._foreach_add_(snapshot, step)
        torch._foreach_copy_(scaled, snapshot)
        snapshot.clear()

    optimizer.register_step_pre_hook(pre_step)
    optimizer.register_step_post_hook(post_step)
    return optimizer
