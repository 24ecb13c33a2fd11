"""Mask-tuning layers: the frozen weight times a learned binary mask, `W_eff = 1[S > threshold] * W`."""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn


class _MaskedWeight(torch.autograd.Function):
    """`weight * 1[scores > threshold]`, with the straight-through gradient `dL/dS := dL/dM = grad * weight`; and,
    as a second output, `||scores||_2` (a zero, not differentiable, unless `with_norm`).

    The same values and gradients as `weight * straight_through_mask(scores, threshold)`, but the backward keeps
    only references to `weight` and `scores` (no float copy of the mask) and the forward builds one boolean mask.
    The norm is the score penalty's ([`regtune.regularizers.MaskScorePenalty`]): its gradient `g * S / ||S||` is
    added here, when the layer's backward runs, rather than by a node of its own at the start of the backward (which
    would hold that gradient for every layer at once until each layer's backward).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, threshold: float, with_norm: bool):
        ctx.threshold = threshold
        ctx.set_materialize_grads(False)
        # M * W (one float temporary: `weight * bool_mask` would first copy the mask to float)
        masked = (scores > threshold).to(weight.dtype).mul_(weight)
        if with_norm:
            norm = torch._foreach_norm([scores.detach()])[0]
            ctx.save_for_backward(weight, scores, norm)
        else:
            norm = scores.new_zeros(())
            ctx.mark_non_differentiable(norm)
            ctx.save_for_backward(weight, scores)
        return masked, norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_norm: torch.Tensor | None):
        weight, scores, *norm = ctx.saved_tensors
        grad_weight = grad_scores = None
        if grad is not None and ctx.needs_input_grad[0]:
            grad_weight = grad * (scores > ctx.threshold)
        if ctx.needs_input_grad[1]:
            if grad is not None:
                grad_scores = (grad * weight).to(scores.dtype)
            if grad_norm is not None and norm:
                # d||S|| / dS = S / ||S|| (0 where S = 0)
                coefficient = torch.where(norm[0] > 0, grad_norm / norm[0], 0.0).to(scores.dtype)
                grad_scores = (
                    scores * coefficient if grad_scores is None else grad_scores.addcmul_(scores, coefficient)
                )
        return grad_weight, grad_scores, None, None


class _Recompute:
    """What the autograd graph keeps of a masked weight: how to rebuild it (see `MaskTuningLayer.masked_forward`)."""

    __slots__ = ("layer", "versions", "base_stride", "size", "stride", "offset")

    def __init__(self, layer, versions, base_stride, size, stride, offset):
        self.layer, self.versions, self.base_stride = layer, versions, base_stride
        self.size, self.stride, self.offset = size, stride, offset


def _outer_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are already active (activation checkpointing, CPU offloading) or disabled."""
    try:
        if not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return True
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except AttributeError:  # private API moved: keep the masked weight in the graph, as autograd would
        return True


class MaskTuningLayer(BaseTunerLayer):
    """Holds one real-valued score tensor per adapter (same shape as the base weight) and merges by masking."""

    adapter_layer_names = ("masktune_scores",)
    other_param_names = ("masktune_threshold", "masktune_removed")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.masktune_scores = nn.ParameterDict({})
        self.masktune_threshold: dict[str, float] = {}
        # merged adapter -> (boolean mask, the weight values it zeroed), so that unmerge restores W exactly
        self.masktune_removed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        # set by `MaskTuningModel.masks_disabled()`: the base weight without any mask, other modules untouched
        self.masktune_masks_off = False
        # set by `MaskScorePenalty`: the forward also returns each score tensor's norm, for the penalty's gradient
        self.masktune_track_norms = False
        self.masktune_norms: dict[str, torch.Tensor] = {}
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs) -> None:
        weight = self.get_base_layer().weight
        scores = torch.full(weight.shape, float(config.score_init), dtype=torch.float32, device=weight.device)
        if not config.init_weights:
            generator = torch.Generator().manual_seed(
                zlib.crc32(adapter_name.encode())
            )  # not hash(): salted per process
            # evenly spread ranks in a random order: about a third of the entries (at least one) fall below the
            # threshold, even in a layer with 2 weights
            numel = weight.numel()
            ranks = torch.randperm(numel, generator=generator).view(weight.shape).to(weight.device)
            noise = (ranks.float() + 0.5) / numel
            scores = config.threshold + (noise - 1.0 / 3.0) * 3.0 * (config.score_init - config.threshold)
        self.masktune_scores[adapter_name] = nn.Parameter(scores)
        self.masktune_threshold[adapter_name] = float(config.threshold)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def binary_mask(self, adapter_name: str) -> torch.Tensor:
        """The hard mask `1[S > threshold]` (boolean) of an adapter."""
        return self.masktune_scores[adapter_name] > self.masktune_threshold[adapter_name]

    def _mask_inputs(self) -> list[tuple[torch.Tensor, float]]:
        return [
            (self.masktune_scores[name], self.masktune_threshold[name])
            for name in self.active_adapters
            if name in self.masktune_scores
        ]

    def masked_weight(self) -> torch.Tensor:
        """`W * M_1 * M_2 * ...` over the active adapters, differentiable in the scores (straight-through:
        `dL/dS := dL/dM`). With `masktune_track_norms` (set by [`regtune.regularizers.MaskScorePenalty`]) and gradient
        enabled, the differentiable norm `||S||_2` of each adapter's scores is kept in `masktune_norms` for the
        penalty of this forward."""
        weight = self.get_base_layer().weight
        track = self.masktune_track_norms and torch.is_grad_enabled()
        for name in self.active_adapters:
            if name in self.masktune_scores:
                scores = self.masktune_scores[name]
                with_norm = track and scores.requires_grad
                weight, norm = _MaskedWeight.apply(weight, scores, self.masktune_threshold[name], with_norm)
                if with_norm:
                    self.masktune_norms[name] = norm
        return weight

    def _recompute_hooks(self, weight: torch.Tensor):
        """Saved-tensor hooks that keep, instead of the masked weight (and its views), the recipe to rebuild it in
        the backward: the base weight and the scores are referenced by the graph anyway, so the forward/backward
        holds no weight-sized tensor per layer beyond what full fine-tuning holds. The rebuilt weight is the same
        computation on the same tensors, bit for bit; an in-place change of the weight or the scores between the
        forward and the backward raises, as autograd does for the tensors it saves."""
        # the hooks live as long as the graph: they must not reference `weight` itself
        storage, device, base_stride = weight.untyped_storage().data_ptr(), weight.device, weight.stride()
        versions = [self.get_base_layer().weight._version, *(s._version for s, _ in self._mask_inputs())]

        def pack(tensor: torch.Tensor):
            try:
                same = tensor.untyped_storage().data_ptr() == storage and tensor.device == device
            except (RuntimeError, NotImplementedError):  # a tensor without storage
                same = False
            if not same:
                return tensor
            return _Recompute(self, versions, base_stride, tensor.size(), tensor.stride(), tensor.storage_offset())

        def unpack(packed):
            if not isinstance(packed, _Recompute):
                return packed
            layer = packed.layer
            tensors = [layer.get_base_layer().weight, *(scores for scores, _ in layer._mask_inputs())]
            if [t._version for t in tensors] != packed.versions:
                raise RuntimeError(
                    "A mask-tuning layer's base weight or scores were modified in place between its forward and its "
                    "backward: the masked weight the forward used cannot be rebuilt for the gradient."
                )
            with torch.no_grad():  # (no norms are kept without gradient)
                rebuilt = layer.masked_weight()
            if rebuilt.stride() != packed.base_stride:  # the same values in the forward's layout
                laid_out = torch.empty_strided(
                    rebuilt.size(), packed.base_stride, dtype=rebuilt.dtype, device=rebuilt.device
                )
                rebuilt = laid_out.copy_(rebuilt)
            return rebuilt.as_strided(packed.size, packed.stride, packed.offset)

        return pack, unpack

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight * self.binary_mask(adapter_name).to(weight.dtype) - weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.masktune_scores:
                continue
            if safe_merge and not torch.isfinite(self.masktune_scores[name]).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight = self.get_base_layer().weight
            mask = self.binary_mask(name).detach()
            self.masktune_removed[name] = (mask, weight.data[~mask].clone())
            weight.data.mul_(mask.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            mask, removed = self.masktune_removed.pop(name)
            self.get_base_layer().weight.data[~mask] = removed

    def masked_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward of every mask layer; the concrete layer's `_forward_with_weight` applies its op."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.masktune_masks_off:
            if self.merged:  # `masks_disabled()` refuses merged layers; this guards a flag set by hand
                raise RuntimeError("A merged mask-tuning layer cannot run with its masks off: unmerge it first.")
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not any(name in self.masktune_scores for name in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        weight = self.masked_weight()
        if not weight.requires_grad or _outer_saved_tensor_hooks():
            return self._forward_with_weight(x, weight)
        with torch.autograd.graph.saved_tensors_hooks(*self._recompute_hooks(weight)):
            return self._forward_with_weight(x, weight)


class _MaskedModule(nn.Module, MaskTuningLayer):
    """The module side shared by every concrete mask layer; a subclass only defines `_forward_with_weight`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        MaskTuningLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = getattr(config, "fan_in_fan_out", False)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.masked_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "masktune." + super().__repr__()


class Linear(_MaskedModule):
    """Mask tuning of an `nn.Linear` (or, with `fan_in_fan_out`, a GPT-2 `Conv1D`)."""

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.get_base_layer().bias
        return F.linear(x.to(weight.dtype), transpose(weight, self.fan_in_fan_out), bias)


class _ConvNd(_MaskedModule):
    """Mask tuning of an `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` (any kernel, stride, padding, dilation, groups)."""

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return base._conv_forward(x.to(weight.dtype), weight, base.bias)


class Conv1d(_ConvNd):
    """Mask tuning of an `nn.Conv1d`."""


class Conv2d(_ConvNd):
    """Mask tuning of an `nn.Conv2d` (the paper also masks the patch embedding of ViT)."""


class Conv3d(_ConvNd):
    """Mask tuning of an `nn.Conv3d`."""


class Embedding(_MaskedModule):
    """Mask tuning of an `nn.Embedding`: entries of the embedding table are masked (the output is a row lookup)."""

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
