from regtune._compat import register_regtune_method

from ..training_hooks import AdapterTrainingHooks, register_training_hooks
from .config import (
    CLIP_LIKE_MODEL_TYPES,
    TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING,
    MaskTuningConfig,
    vision_tower_target_modules,
)
from .importance import rank_modules_by_gradient
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, MaskTuningLayer
from .model import MaskTuningModel, published_scores, save_real_valued_scores


__all__ = [
    "CLIP_LIKE_MODEL_TYPES",
    "TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "MaskTuningConfig",
    "MaskTuningLayer",
    "MaskTuningModel",
    "published_scores",
    "rank_modules_by_gradient",
    "save_real_valued_scores",
    "vision_tower_target_modules",
]

register_regtune_method(name="mask_tuning", config_cls=MaskTuningConfig, model_cls=MaskTuningModel, prefix="masktune_")
register_training_hooks(AdapterTrainingHooks("mask_tuning", checkpoint_context=save_real_valued_scores))
