"""Helpers for regularizers that read parameters or their gradients outside the forward, under FSDP2 sharding.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, Accelerate's `fsdp_version: 2`) every parameter outside the forward
is a `DTensor` holding this process's shard (its `.grad` too, once reduce-scattered); during the forward of its
module the parameter is swapped for the all-gathered, unsharded tensor, and the autograd graph only knows that one.
So:

- reductions over parameters or gradients (norms) taken on the `DTensor`s are global (torch's DTensor ops reduce
  across the shards); [`full`] gathers a value when a plain tensor is needed;
- `torch.autograd.grad` with respect to the sharded parameters finds them unused: a regularizer that needs per-pass
  gradients takes them with respect to the tensors the forward saw ([`forward_tensors`]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None
    distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (an FSDP2-sharded parameter or gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` (the model is sharded with FSDP2 or tensor parallelism)."""
    return any(is_sharded(p) for p in model.parameters())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of `tensor` as a plain tensor (gathered from the shards for a `DTensor`; differentiable)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """
    `value` (a full, plain tensor equal on every process) laid out like `reference`: this process's shard as a
    `DTensor` when `reference` is one (no communication), else `value` itself.
    """
    if not is_sharded(reference):
        return value
    return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)


@torch.no_grad()
def foreach_copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """`torch._foreach_copy_(targets, sources)`, one `copy_` per tensor for `DTensor`s (no foreach copy for them)."""
    if targets and is_sharded(targets[0]):
        for target, source in zip(targets, sources):
            target.copy_(source)
    elif targets:
        torch._foreach_copy_(list(targets), list(sources))


@contextlib.contextmanager
def forward_tensors(owners: Sequence[tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]) -> Iterator[list]:
    """
    Within the context, record for every `(module, read)` of `owners` the tensor `read(module)` returns when `module`
    runs its forward (a forward pre-hook): the unsharded parameter under FSDP2, the parameter itself otherwise. The
    yielded list holds one entry per owner, `None` until its module has run.
    """
    seen: list = [None] * len(owners)
    handles = []
    try:
        for index, (module, read) in enumerate(owners):

            def hook(mod, args, index=index, read=read):
                seen[index] = read(mod)

            handles.append(module.register_forward_pre_hook(hook))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---- DeepSpeed ----

# what cannot run under DeepSpeed, by class name (no imports of the regularizers here): (ZeRO stages, why)
_DEEPSPEED_LIMITS = {
    "GLADRegularizer": (
        (0, 1, 2, 3),
        "GLAD runs a second backward pass inside the optimizer step and rewrites the parameters' `.grad`, while the "
        "DeepSpeed engine counts every backward as a micro-step and keeps the gradients in its own buffers",
    ),
    "GradientDropout": (
        (0, 1, 2, 3),
        "gradient dropout rewrites the mask scores' `.grad` after the last backward of the step, while the DeepSpeed "
        "engine keeps the gradients in its own buffers",
    ),
    "MaskScorePenalty": (
        (3,),
        "the score penalty reads the mask scores outside the forward, where ZeRO-3 leaves only an empty placeholder "
        "of each partitioned parameter",
    ),
}


def deepspeed_zero_stage(trainer) -> int | None:
    """The ZeRO stage of the trainer's DeepSpeed engine, or `None` when it does not run DeepSpeed."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


def check_distributed_support(trainer) -> None:
    """
    Refuse, before training, what regtune cannot run under the trainer's DeepSpeed ZeRO stage (a `ValueError` that
    names every regularizer or adapter concerned and the reason). Nothing to check without DeepSpeed: DDP runs
    everything, and under FSDP2 LfU refuses by itself. docs/distributed.md has the whole table.
    """
    stage = deepspeed_zero_stage(trainer)
    if stage is None:
        return
    problems = []
    for reg in getattr(trainer, "regularizers", []):
        for cls in type(reg).__mro__:
            limit = _DEEPSPEED_LIMITS.get(cls.__name__)
            if limit is not None and stage in limit[0]:
                problems.append(f"{type(reg).__name__} ({reg.name!r}): {limit[1]}")
                break
    model = getattr(trainer, "model", None)
    modes = set()
    for module in model.modules() if model is not None else []:
        modes.update(getattr(module, "allora_scale_gradients", {}).values())  # ALLoRA layers: True = gradient mode
    if False in modes:
        problems.append(
            "ALLoRA adapters with coefficient_on='update': their optimizer rescales the update of the model's A and "
            "B, while the DeepSpeed engine steps its own copy of the parameters"
        )
    if stage == 3 and True in modes:
        problems.append(
            "ALLoRA adapters with coefficient_on='gradient': their forward reads the A and B weights directly, "
            "where ZeRO-3 leaves only empty placeholders of the partitioned parameters"
        )
    if problems:
        raise ValueError(
            f"regtune cannot train this under DeepSpeed ZeRO-{stage}: "
            + "; ".join(problems)
            + ". Use DDP (configs/accelerate/ddp.yaml) or FSDP2 (configs/accelerate/fsdp2.yaml); see "
            "docs/distributed.md."
        )
