"""Choose which modules to mask: rank candidates by gradient-magnitude importance on a few batches."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D


def rank_modules_by_gradient(
    model: nn.Module,
    batches: Iterable[dict],
    candidates: Iterable[str] | None = None,
    top_k: int | None = None,
) -> list[str]:
    """
    Rank weight-bearing modules by the mean first-order importance `|dL/dW * W|` (the change of the loss when the
    whole weight is masked out, to first order -- what a mask's straight-through gradient sees) over `batches`, and
    return the names of the `top_k` most important ones, usable as `MaskTuningConfig(target_modules=...)`.

    The R-AMT paper picks the attention weights with such an analysis
    ([paper](https://huggingface.co/papers/2307.15049)); the model is left unchanged (gradients are cleared).

    Args:
        model (`torch.nn.Module`): a model whose forward returns a `loss` for the batches.
        batches (`Iterable[dict]`): a few training batches (keyword arguments of the forward, with labels).
        candidates (`Iterable[str]`, *optional*): substrings; only modules whose name contains one are ranked.
            Defaults to every `nn.Linear` / `Conv1D` / `nn.Conv2d` except the output head (`lm_head`, `classifier`).
        top_k (`int`, *optional*): how many names to return (all, ranked, by default).

    Returns:
        `list[str]`: full module names, most important first.
    """
    kinds = (nn.Linear, Conv1D, nn.Conv2d)
    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if candidates is not None and not any(c in name for c in candidates):
            continue
        if candidates is None and name.split(".")[-1] in ("lm_head", "classifier", "score", "head"):
            continue
        modules[name] = module
    if not modules:
        raise ValueError("rank_modules_by_gradient: no candidate module found (check `candidates`).")
    requires = {name: m.weight.requires_grad for name, m in modules.items()}
    for m in modules.values():
        m.weight.requires_grad_(True)
    scores = dict.fromkeys(modules, 0.0)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch)["loss"].backward()
            for name, m in modules.items():
                scores[name] += float((m.weight.grad * m.weight).detach().abs().mean())
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, m in modules.items():
            m.weight.requires_grad_(requires[name])
        model.train(was_training)
    if count == 0:
        raise ValueError("rank_modules_by_gradient: `batches` is empty.")
    ranked = sorted(scores, key=scores.get, reverse=True)
    return ranked[:top_k] if top_k is not None else ranked
