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
