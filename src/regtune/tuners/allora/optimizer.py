"""ALLoRA's row coefficient applied to the optimizer *update* instead of the gradient (`coefficient_on="update"`).

Under Adam a slowly varying per-row gradient scale is largely normalized away, so the gradient-side reading may
carry little of the paper's effect. This optimizer factory, in the style of `peft.optimizers.create_loraplus_optimizer`,
scales what the optimizer does to each row instead:

    B_i <- B_i + c_i * (step_i)          (c_i: ALLoRA's coefficient of output row i, from the weights before the step)
    A   <- A   + mean_i(c_i) * (step)    (A has no output rows; its rows mix all of them, so it gets the layer mean)

where `step` is what the wrapped optimizer would have done (including decoupled weight decay, which is scaled too).
Both `c` and the mean equal `eta` at `dW = 0`. With `row_norm="factors"` every row of `A` and `B` gets its own
coefficient instead.

Because an adapter with `coefficient_on="update"` computes plain LoRA gradients, stepping it with any other optimizer
would silently train plain LoRA. A process-wide `torch.optim` step pre-hook therefore refuses that, at the first step
of such an optimizer, with the fix in the message.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from regtune._sharding import foreach_copy_, is_sharded

from .layer import ALLoRALayer, _install_global_hooks, _Registry, allora_adapters


_ALLORA_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()  # optimizers that apply the update-side coefficient
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> update_layers_version checked


class ALLoRAOptimizerError(RuntimeError):
    """An optimizer that does not apply ALLoRA's update-side coefficient steps an adapter with
    `coefficient_on="update"` (it would train plain LoRA)."""


def _update_mode_parameters() -> dict[int, str]:
    """`{id(param): description}` of the trainable A/B of every live adapter with `coefficient_on="update"`."""
    found = {}
    for layer in list(_Registry.update_layers):
        for name, is_gradient in layer.allora_scale_gradients.items():
            if is_gradient:
                continue
            try:
                weights = layer.allora_weights(name)
            except KeyError:  # adapter deleted
                continue
            for weight in weights:
                if weight.requires_grad:
                    found[id(weight)] = f"{type(layer).__name__} adapter {name!r}"
    return found


def _wrapped(optimizer):
    """`optimizer` and the optimizers it wraps (accelerate's `AcceleratedOptimizer.optimizer`, ...)."""
    seen = []
    while optimizer is not None and all(optimizer is not s for s in seen) and len(seen) < 8:
        seen.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return seen


def _guard_optimizer_step(optimizer, args, kwargs) -> None:
    """Global `torch.optim` step pre-hook: refuse to step update-mode ALLoRA adapters without their coefficient."""
    if not _Registry.update_layers:
        return
    if any(opt in _ALLORA_OPTIMIZERS for opt in _wrapped(optimizer)):
        return
    version = _Registry.update_layers_version
    if _CHECKED.get(optimizer) == version:
        return
    update_params = _update_mode_parameters()
    hits = sorted(
        {
            update_params[id(p)]
            for group in getattr(optimizer, "param_groups", [])
            for p in group["params"]
            if id(p) in update_params
        }
    )
    if hits:
        raise ALLoRAOptimizerError(
            f"{type(optimizer).__name__} is stepping ALLoRA adapters with coefficient_on='update' "
            f"({', '.join(hits[:3])}{', ...' if len(hits) > 3 else ''}), but it does not apply ALLoRA's update-side "
            "row coefficient, so it would train plain LoRA. Fix: train with a regtune trainer (RegTrainer, "
            "LfUTrainer, ...: they build the ALLoRA optimizer themselves), or build the optimizer with "
            "`regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=...)`, or attach the coefficient to your "
            "own optimizer with `regtune.tuners.allora.attach_allora_update(optimizer, model)`; or use "
            "ALLoRAConfig(coefficient_on='gradient')."
        )
    _CHECKED[optimizer] = version


_Registry.step_pre_checks.append(_guard_optimizer_step)


def attach_allora_update(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """
    Make `optimizer` apply ALLoRA's update-side coefficient to the update-mode ALLoRA adapters of `model`.

    Registers a step pre-hook (copies `A` and `B` of those adapters that the optimizer steps, and computes their
    coefficients from the weights before the step) and a step post-hook (rescales the change the optimizer made,
    row by row). Adapters with `coefficient_on="gradient"` and parameters outside the optimizer are left alone.
    Does nothing (and returns `optimizer`) when `model` has no such adapter.

    Args:
        optimizer (`torch.optim.Optimizer`): an optimizer over (some of) `model`'s parameters.
        model (`torch.nn.Module`): a peft model with ALLoRA adapters.

    Returns:
        `torch.optim.Optimizer`: `optimizer`, with the hooks registered.
    """
    if optimizer in _ALLORA_OPTIMIZERS:
        return optimizer
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers: list[tuple[ALLoRALayer, str]] = []
    scaled: list[torch.Tensor] = []
    for _, module, name in allora_adapters(model):
        if module.allora_scale_gradients[name]:
            continue
        weight_A, weight_B = module.allora_weights(name)
        if id(weight_A) in stepped or id(weight_B) in stepped:
            layers.append((module, name))
            scaled.extend((weight_A, weight_B))
    if not layers:
        return optimizer
    _install_global_hooks()
    sharded = any(is_sharded(p) for p in scaled)
    snapshot: list[torch.Tensor] = []  # A, B before the step (kept between steps, refilled in place)
    snapshot_layout: list[tuple] = []
    scales: list[torch.Tensor] = []

    @torch.no_grad()
    def pre_step(opt, args, kw):
        if sharded:  # FSDP2's DTensor parameters: a fresh copy (no in-place foreach copy for them)
            snapshot[:] = torch._foreach_mul(scaled, 1.0)
        else:
            layout = [(p.shape, p.dtype, p.device) for p in scaled]
            if layout != snapshot_layout:
                snapshot[:] = [torch.empty_like(p) for p in scaled]
                snapshot_layout[:] = layout
            torch._foreach_copy_(snapshot, scaled)
        scales.clear()
        # the coefficients of the weights before the step (computed once for all layers, batched; float32)
        for module, name in layers:
            scales.extend(module.allora_param_scales(name))
        for k, (scale, param) in enumerate(zip(scales, scaled)):
            if scale.dtype != param.dtype:
                scales[k] = scale.to(param.dtype)

    @torch.no_grad()
    def post_step(opt, args, kw):
        # p <- p_old + scale * (p_new - p_old)
        if sharded:  # FSDP2's DTensor parameters: no in-place foreach copy for them
            step = torch._foreach_sub(scaled, snapshot)
            torch._foreach_mul_(step, scales)
            torch._foreach_add_(snapshot, step)
            foreach_copy_(scaled, snapshot)
        else:  # in place on the parameters: the same values (the sum's operands are swapped), 3 passes, no copy
            torch._foreach_sub_(scaled, snapshot)
            torch._foreach_mul_(scaled, scales)
            torch._foreach_add_(scaled, snapshot)
        if sharded:
            snapshot.clear()
        scales.clear()

    optimizer.register_step_pre_hook(pre_step)
    optimizer.register_step_post_hook(post_step)
    _ALLORA_OPTIMIZERS.add(optimizer)
    return optimizer


def create_allora_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, **kwargs
) -> torch.optim.Optimizer:
    """
    Create an optimizer that applies ALLoRA's row coefficient to the parameter update.

    The ALLoRA adapters of `model` must use `coefficient_on="update"` (their layers then compute plain gradients);
    any other trainable parameter is optimized normally by `optimizer_cls`. regtune's trainers do this themselves
    (through [`attach_allora_update`] on the optimizer they build).

    Args:
        model (`torch.nn.Module`): a peft model with ALLoRA adapters.
        optimizer_cls (`type[torch.optim.Optimizer]`): e.g. `torch.optim.AdamW`.
        lr (`float`): learning rate.
        **kwargs: passed on to `optimizer_cls`.

    Returns:
        `torch.optim.Optimizer`: an `optimizer_cls` instance with step hooks that rescale the update.

    Example:

        ```py
        >>> model = get_peft_model(base, regtune.ALLoRAConfig(r=8, coefficient_on="update"))
        >>> optimizer = regtune.create_allora_optimizer(model, torch.optim.AdamW, lr=1e-3)
        >>> trainer = transformers.Trainer(model=model, optimizers=(optimizer, None), ...)
        ```
    """
    trainable = False
    for _, module, name in allora_adapters(model):
        if module.allora_scale_gradients[name]:
            raise ValueError(
                f"create_allora_optimizer: adapter '{name}' has coefficient_on='gradient', so its gradients are "
                "already scaled; scaling the update too would apply the coefficient twice. Build the model with "
                "ALLoRAConfig(coefficient_on='update')."
            )
        trainable = trainable or any(w.requires_grad for w in module.allora_weights(name))
    if not trainable:
        raise ValueError("create_allora_optimizer: the model has no trainable ALLoRA adapter.")
    params = [p for p in model.parameters() if p.requires_grad]
    return attach_allora_update(optimizer_cls(params, lr=lr, **kwargs), model)
