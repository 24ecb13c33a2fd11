"""The mask-tuning tuner: injects [`Linear`] / [`Conv2d`] mask layers and saves the masks bit-packed."""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from regtune.functional.masks import pack_mask, unpack_mask

from .config import TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING
from .layer import Conv2d, Linear, MaskTuningLayer


SCORES = "masktune_scores"
PACKED = "masktune_packed_mask"

_SAVE_SCORES = contextvars.ContextVar("regtune_mask_tuning_save_scores", default=False)


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

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
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
        if isinstance(base, torch.nn.Conv2d):
            return Conv2d(target, adapter_name, config)
        raise ValueError(
            f"Mask tuning supports `torch.nn.Linear`, `Conv1D` and `torch.nn.Conv2d` targets, got {type(base).__name__}."
        )

    def _replace_module(self, parent, child_name, new_module, child):
        setattr(parent, child_name, new_module)
        device = child.get_base_layer().weight.device if isinstance(child, BaseTunerLayer) else child.weight.device
        for name, param in new_module.named_parameters():
            if self.prefix in name:
                param.data = param.data.to(device)

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
        if _SAVE_SCORES.get():
            return selected
        packed = {}
        for key, value in selected.items():
            if f".{SCORES}." in key:
                packed[key.replace(f".{SCORES}.", f".{PACKED}.")] = pack_mask(value > config.threshold)
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
                # any score above the threshold gives the same mask: use score_init (kept) and 0 (removed)
                converted[scores_key] = torch.where(mask, config.score_init, 0.0).to(torch.float32)
            else:
                converted[key] = value
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, converted)

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
