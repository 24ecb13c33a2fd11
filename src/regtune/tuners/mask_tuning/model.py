"""The mask-tuning tuner: injects mask layers ([`Linear`], [`Conv2d`], ...) and saves the masks bit-packed."""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from regtune._sharding import full
from regtune.functional.masks import pack_mask, unpack_mask

from .config import (
    CLIP_LIKE_MODEL_TYPES,
    TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING,
    vision_tower_target_modules,
)
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, MaskTuningLayer


_CONV_LAYERS = ((torch.nn.Conv1d, Conv1d), (torch.nn.Conv2d, Conv2d), (torch.nn.Conv3d, Conv3d))
_UNSUPPORTED_REASONS = {
    "MultiheadAttention": (
        " (its projections live in one fused `in_proj_weight`, and its forward reads `in_proj_weight` and"
        " `out_proj.weight` directly, so a masked copy cannot be swapped in without re-implementing the attention;"
        " use a model with separate projection layers, e.g. transformers' CLIP with its `q_proj`/`k_proj`/`v_proj`/"
        "`out_proj`)"
    ),
}

SCORES = "masktune_scores"
PACKED = "masktune_packed_mask"

_SAVE_SCORES = contextvars.ContextVar("regtune_mask_tuning_save_scores", default=False)


def published_scores(score_init: float, threshold: float) -> tuple[float, float]:
    """
    The scores that loading a published (bit-packed) mask gives to kept and removed entries: `score_init` and its
    mirror image below the threshold, `2 * threshold - score_init` (0.0 with the defaults). Both sit at the same
    distance from the threshold, and the removed one is below it for any threshold, negative ones included.
    """
    return float(score_init), float(2.0 * threshold - score_init)


@contextlib.contextmanager
def save_real_valued_scores():
    """Within this context, `save_pretrained` stores the real-valued scores instead of bit-packed masks.

    Trainer checkpoints need the scores (and the optimizer state) to resume exactly; regtune's trainers enter this
    context when they write a checkpoint. The published adapter (`save_pretrained` outside of it) holds only the
    binary masks, 8 entries per byte.
    """
    token = _SAVE_SCORES.set(True)
    try:
        yield
    finally:
        _SAVE_SCORES.reset(token)


class MaskTuningModel(BaseTuner):
    """
    Regularized mask tuning (R-AMT, [paper](https://huggingface.co/papers/2307.15049)) as a peft tuner: learned binary
    masks over frozen weights. Use it through `peft.get_peft_model` with a [`MaskTuningConfig`].

    `save_pretrained` stores the masks bit-packed (`uint8`, 8 entries per byte); loading restores an identical model.
    `merge_and_unload` multiplies the masks into the weights, so inference costs exactly the base model.

    Example:

        ```py
        >>> import regtune
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, regtune.MaskTuningConfig())  # attention projections by default
        >>> regtune.mask_sparsity(model)["total"]
        0.0
        ```
    """

    prefix: str = "masktune_"
    tuner_layer_cls = MaskTuningLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config, model_config):
        """
        Resolve `score_penalty_qkv="auto"` and the default `target_modules` (see [`MaskTuningConfig`]). For a CLIP-like model
        (`CLIP_LIKE_MODEL_TYPES`) it is the released R-AMT placement, a regex ([`vision_tower_target_modules`]) into
        which `layers_to_transform` / `layers_pattern` are folded (peft ignores them for a string target, so they are
        cleared: the saved config names exactly the masked modules). Other models: peft's per-family mapping.
        """
        model_type = model_config.get("model_type") if isinstance(model_config, dict) else None
        if getattr(peft_config, "score_penalty_qkv", None) == "auto":
            peft_config.score_penalty_qkv = "fused" if model_type in CLIP_LIKE_MODEL_TYPES else "separate"
        if peft_config.target_modules is None and model_type in CLIP_LIKE_MODEL_TYPES:
            peft_config.target_modules = vision_tower_target_modules(
                peft_config.layers_to_transform,
                peft_config.layers_pattern,
                vision_only=model_type.endswith("_vision_model"),
            )
            peft_config.layers_to_transform = None
            peft_config.layers_pattern = None
            return peft_config
        return super()._prepare_adapter_config(peft_config, model_config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(parent, torch.nn.MultiheadAttention):
            raise ValueError(
                f"Mask tuning cannot mask `{current_key}`: it is the `{target_name}` of a `torch.nn.MultiheadAttention`, "
                "whose forward reads that weight directly instead of calling the module, so its mask would be ignored "
                "silently. Leave it out of `target_modules` (or add it to `exclude_modules`). See docs/mask_tuning.md."
            )
        if isinstance(target, MaskTuningLayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, torch.nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is True but the target is `torch.nn.Linear`; setting it to False.", stacklevel=2
                )
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, config)
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is False but the target is `Conv1D`; setting it to True.", stacklevel=2)
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, config)
        for kind, layer_cls in _CONV_LAYERS:
            if type(base) is kind:  # not ConvTranspose (a subclass of _ConvNd with another forward)
                return layer_cls(target, adapter_name, config)
        if isinstance(base, torch.nn.Embedding):
            return Embedding(target, adapter_name, config)
        reason = _UNSUPPORTED_REASONS.get(type(base).__name__, "")
        raise ValueError(
            f"Mask tuning supports `torch.nn.Linear`, transformers' `Conv1D`, `torch.nn.Conv1d`/`Conv2d`/`Conv3d` and "
            f"`torch.nn.Embedding` targets, got {type(base).__name__}{reason}. See docs/mask_tuning.md."
        )

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel drops `adapter_names` before calling the base model: refuse it instead of ignoring it silently
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Mask tuning does not support mixed-adapter batches (`adapter_names`): a mask changes the weight "
                "itself, so each sample would need its own weight matrix."
            )
        yield

    # ---- bit-packed save / load ----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if _SAVE_SCORES.get() or config.save_format == "scores":
            return selected
        packed = {}
        for key, value in selected.items():
            if f".{SCORES}." in key:
                # FSDP2: the scores are sharded DTensors; gather them (every process calls this) before packing
                packed[key.replace(f".{SCORES}.", f".{PACKED}.")] = pack_mask(full(value) > config.threshold)
            else:
                packed[key] = value
        return packed

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        shapes = {k: v.shape for k, v in model.state_dict().items() if f".{SCORES}." in k}
        converted = {}
        for key, value in state_dict.items():
            if key.endswith(f".{PACKED}"):
                scores_key = key[: -len(PACKED)] + SCORES
                model_key = f"{scores_key}.{adapter_name}"
                if model_key not in shapes:
                    model_key = model_key.removeprefix("base_model.model.")
                mask = unpack_mask(value, shapes[model_key])
                kept, removed = published_scores(config.score_init, config.threshold)
                converted[scores_key] = torch.where(mask, kept, removed).to(torch.float32)
            else:
                converted[key] = value
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, converted)

    # ---- what mask tuning does not support ----

    def add_weighted_adapter(self, *args, **kwargs):
        """Not supported: refuses with the reason (see docs/mask_tuning.md)."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for MASK_TUNING, because a mask-tuning adapter is a binary mask "
            "over the frozen weights, not an additive update: a weighted sum of masks is not a mask, and products of "
            "masks are what several active adapters already compute (`set_adapter([...])`)."
        )

    # ---- the model with its masks off (the teacher of gradient dropout) ----

    @contextlib.contextmanager
    def masks_disabled(self):
        """
        Within this context the model runs with every mask off (each masked layer uses its frozen weight) while every
        other module -- a trained classifier head in `modules_to_save` included -- keeps its current state.

        Unlike peft's `disable_adapter()`, this does not swap `modules_to_save` modules back to their original
        weights: it is the teacher of R-AMT's gradient dropout, the pre-trained weights with the *current* head.

        Raises:
            `ValueError`: when a mask is merged into its weight (the frozen weight is then not at hand; unmerge first).
        """
        layers = [m for m in self.model.modules() if isinstance(m, MaskTuningLayer)]
        merged = [m for m in layers if m.merged]
        if merged:
            raise ValueError(
                "masks_disabled(): some masks are merged into their weights, so the model with its masks off is not "
                "available; call `unmerge_adapter()` first."
            )
        previous = [m.masktune_masks_off for m in layers]
        for m in layers:
            m.masktune_masks_off = True
        try:
            yield
        finally:
            for m, flag in zip(layers, previous):
                m.masktune_masks_off = flag

    # ---- reporting ----

    def mask_sparsity(self, adapter_name: str | None = None) -> dict[str, float]:
        """Share of zero mask entries per masked module and in total (`"total"`)."""
        adapter_name = adapter_name or self.active_adapters[0]
        result, zeros, total = {}, 0, 0
        for name, module in self.model.named_modules():
            if isinstance(module, MaskTuningLayer) and adapter_name in module.masktune_scores:
                mask = module.binary_mask(adapter_name)
                layer_zeros = int((~mask).sum())
                result[name] = layer_zeros / mask.numel()
                zeros, total = zeros + layer_zeros, total + mask.numel()
        result["total"] = zeros / total if total else 0.0
        return result
