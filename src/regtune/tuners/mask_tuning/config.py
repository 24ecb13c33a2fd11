"""Configuration of regularized mask tuning (R-AMT)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from regtune._deprecation import training_knob_in_adapter_config

from .settings import DEFAULTS, HELP, check_bool, check_fields, check_str_list, raise_if_errors


SAVE_FORMATS = ("bit_packed", "scores")
SCORE_PENALTY_QKV = ("auto", "fused", "separate")
# the separate Q, K, V projections of one attention, per naming family (the released code's fused `in_proj`)
QKV_PROJECTIONS = {
    "q_proj": "proj", "k_proj": "proj", "v_proj": "proj",
    "query": "bert", "key": "bert", "value": "bert",
    "q_lin": "lin", "k_lin": "lin", "v_lin": "lin",
    "q": "t5", "k": "t5", "v": "t5",
}  # fmt: skip

# The released placement for CLIP-like dual encoders (R-AMT's `trainers/masktuning.py` builds only the image tower
# with mask layers, `modules/visiontransformer.py`): the image tower's patch-embedding conv and every attention's
# input and output projections, MLP off (`configs/trainers/MASK/vit_b16.yaml`: `MASK_MLP: False`), nothing of the
# text tower. The released `in_proj` (one fused Q/K/V weight) is transformers' separate `q_proj`, `k_proj`, `v_proj`.
VISION_TOWER_LAYERS_PATTERN = "layers"
VISION_TOWER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def vision_tower_target_modules(
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
    vision_only: bool = False,
) -> str:
    """
    The released R-AMT placement on a transformers CLIP-like model (CLIP, SigLIP; the full model or its vision model
    alone), as a `target_modules` regex: the vision tower's `embeddings.patch_embedding` and the `q_proj`, `k_proj`,
    `v_proj` and `out_proj` of each of its encoder layers; no MLP, nothing of the text tower.

    Args:
        layers_to_transform (`Union[list[int], int]`, *optional*):
            Only the attention projections of the encoder layers with these indices (the patch embedding stays).
        layers_pattern (`Union[list[str], str]`, *optional*):
            Name of the layer container; defaults to `"layers"` (transformers' CLIP and SigLIP encoders).
        vision_only (`bool`, defaults to `False`):
            The model is the vision tower alone (`CLIPVisionModel`, `model_type="clip_vision_model"`, whose modules
            need not sit under `vision_model.`). `False`: a dual encoder, only the modules under `vision_model.`.

    Returns:
        `str`: a regex matched against full module names with `re.fullmatch`, as peft does for a string
        `target_modules`.

    Example:

        ```py
        >>> import re
        >>> pattern = vision_tower_target_modules()
        >>> bool(re.fullmatch(pattern, "vision_model.encoder.layers.3.self_attn.q_proj"))
        True
        >>> bool(re.fullmatch(pattern, "text_model.encoder.layers.3.self_attn.q_proj"))
        False
        ```
    """
    if layers_to_transform is None:
        index = r"\d+"
    else:
        indices = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        index = "(?:" + "|".join(str(int(i)) for i in indices) + ")"
    patterns = layers_pattern or VISION_TOWER_LAYERS_PATTERN
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    container = "(?:" + "|".join(re.escape(p) for p in patterns) + ")"
    projections = "(?:" + "|".join(VISION_TOWER_PROJECTIONS) + ")"
    tower = r"(?:.*\.)?" if vision_only else r"(?:.*\.)?vision_model\."
    return rf"{tower}(?:embeddings\.patch_embedding|encoder\.{container}\.{index}\.self_attn\.{projections})"


# model types whose default is the released placement above (the vision tower only, patch embedding included)
CLIP_LIKE_MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")

# default targets per model family: the attention projections (Q, K, V and out), except for CLIP-like models, which
# get the released placement (a regex; see `vision_tower_target_modules`)
TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "vit": ["query", "key", "value", "attention.output.dense"],
    "t5": ["q", "k", "v", "o"],
    **{
        model_type: vision_tower_target_modules(vision_only=model_type.endswith("_vision_model"))
        for model_type in CLIP_LIKE_MODEL_TYPES
    },
}


@dataclass
class MaskTuningConfig(PeftConfig):
    """
    Configuration for regularized mask tuning, R-AMT ([paper](https://huggingface.co/papers/2307.15049)): a learned
    binary mask over each frozen weight, `W_eff = 1[S > threshold] * W`, with real-valued scores `S` trained through
    a straight-through estimator. At initialization every score is `score_init > threshold`, so the model is the
    pre-trained one.

    Args:
        target_modules (`Union[list[str], str]`, *optional*):
            Modules to mask (`nn.Linear`, transformers' `Conv1D`, `nn.Conv1d`/`Conv2d`/`Conv3d`, `nn.Embedding`;
            `nn.MultiheadAttention` and its `out_proj` are refused, see docs/mask_tuning.md). Defaults to the
            attention projections (Q, K, V and out) of the model family
            (`TRANSFORMERS_MODELS_TO_MASK_TUNING_TARGET_MODULES_MAPPING`); for CLIP-like models (`model_type` in
            `CLIP_LIKE_MODEL_TYPES`: CLIP, SigLIP, full or vision model) to the released R-AMT placement instead:
            the vision tower's patch embedding and its attention projections, nothing of the text tower, no MLP
            ([`vision_tower_target_modules`]; `target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]` masks
            both towers). See also [`regtune.rank_modules_by_gradient`] for an importance-based choice.
        exclude_modules (`Union[list[str], str]`, *optional*): modules not to mask.
        score_init (`float`, defaults to `1e-2`): initial value of every score.
        threshold (`float`, defaults to `5e-3`): a weight is kept where its score is above it.
        score_l2_weight (`float`, defaults to `1e-4`):
            Weight of the score regularizer `sum_l ||S_l||_2` (unsquared) added to the task loss in training.
        graddrop_lambda (`float`, defaults to `1.0`):
            Gradient-dropout strength in [0, 1] used by [`regtune.MaskTuningTrainer`]. The default is the released
            configs' (`configs/trainers/MASK/vit_b16.yaml`, used by its base-to-novel script); the released README
            sets 0.3 for its 16-shot few-shot runs on most data sets.
        score_penalty_qkv (`str`, defaults to `"auto"`):
            How the score penalty counts the Q, K and V projections of one attention: `"fused"`, one norm over the
            three score tensors together, `||[S_q; S_k; S_v]||_2` (the released code, whose attention holds Q, K
            and V in one fused `in_proj` weight with one score tensor); `"separate"`, one norm per score tensor;
            `"auto"`, `"fused"` on CLIP-like models (`CLIP_LIKE_MODEL_TYPES`, R-AMT's own model) and `"separate"`
            on others. Resolved when the adapter is added, so the saved config records `"fused"` or `"separate"`.
        fan_in_fan_out (`bool`, defaults to `False`): set for layers storing weights as (fan_in, fan_out).
        layers_to_transform (`Union[list[int], int]`, *optional*):
            Only these layer indices (with the CLIP-like default: the attention projections of these vision layers,
            and the patch embedding).
        layers_pattern (`Union[list[str], str]`, *optional*): name of the layer container (with layers_to_transform).
        modules_to_save (`list[str]`, *optional*): modules trained fully and saved (e.g. a classifier head).
        init_weights (`bool`, defaults to `True`):
            `True`: all scores `score_init` (identity). `False`: scores spread around the threshold in a random order,
            so that about a third of the mask (at least one entry per layer) is zero -- for tests only.
        save_format (`str`, defaults to `"bit_packed"`):
            What `save_pretrained` stores: `"bit_packed"`, the binary masks, 8 entries per byte (R-AMT's published
            format; loading gives kept entries the score `score_init` and removed ones `2 * threshold - score_init`,
            so the loaded model computes exactly the same function), or `"scores"`, the real-valued scores (32 times
            larger; loading restores every parameter exactly, e.g. to continue training from a published adapter).
            Trainer checkpoints of regtune's trainers always keep the scores.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to mask; default: the attention projections of the model family (CLIP-like models: the "
            "vision tower's patch embedding and attention projections, the released R-AMT placement)."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to mask."})
    score_init: float = field(default=DEFAULTS["score_init"], metadata={"help": HELP["score_init"]})
    threshold: float = field(default=DEFAULTS["threshold"], metadata={"help": HELP["threshold"]})
    score_l2_weight: float = field(default=DEFAULTS["score_l2_weight"], metadata={"help": HELP["score_l2_weight"]})
    graddrop_lambda: float = field(default=DEFAULTS["graddrop_lambda"], metadata={"help": HELP["graddrop_lambda"]})
    score_penalty_qkv: str = field(
        default="auto",
        metadata={
            "help": "Score penalty over one attention's Q, K, V: 'fused' (one norm, as the released fused in_proj), "
            "'separate' (one norm per tensor) or 'auto' ('fused' on CLIP-like models, else 'separate')."
        },
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Layer stores weight as (fan_in, fan_out)."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only mask the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer container, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a classifier)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity init. False: random scores around the threshold (tests)."}
    )
    save_format: str = field(
        default="bit_packed",
        metadata={"help": "What save_pretrained stores: 'bit_packed' binary masks (8 per byte) or the real 'scores'."},
    )

    def __post_init__(self):
        raise_if_errors(type(self).__name__, self._field_errors())
        training_knob_in_adapter_config(
            "MaskTuningConfig",
            {"score_l2_weight": "MaskTuningTrainingArguments(score_l2_weight=)",
             "graddrop_lambda": "MaskTuningTrainingArguments(graddrop_lambda=)"},
            {"score_l2_weight": self.score_l2_weight, "graddrop_lambda": self.graddrop_lambda},
            DEFAULTS,
        )  # fmt: skip
        super().__post_init__()
        self.peft_type = PeftType.MASK_TUNING
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, (list, tuple)) else self.exclude_modules
        )

    def _field_errors(self) -> list[str]:
        """Every invalid field (type, range, finiteness, relations), as messages naming the field."""
        errors = check_fields({name: getattr(self, name) for name in DEFAULTS if hasattr(self, name)})
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            errors.append(check_str_list(name, getattr(self, name)))
        for name in ("fan_in_fan_out", "init_weights", "inference_mode"):
            errors.append(check_bool(name, getattr(self, name)))
        if self.score_penalty_qkv not in SCORE_PENALTY_QKV:
            errors.append(
                f"`score_penalty_qkv` must be one of {list(SCORE_PENALTY_QKV)}, got {self.score_penalty_qkv!r}"
            )
        if self.save_format not in SAVE_FORMATS:
            errors.append(f"`save_format` must be one of {list(SAVE_FORMATS)}, got {self.save_format!r}")
        layers = self.layers_to_transform
        as_list = [layers] if not isinstance(layers, (list, tuple)) else list(layers)
        if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in as_list):
            errors.append(f"`layers_to_transform` must be None, an int >= 0 or a list of them, got {layers!r}")
        if self.layers_pattern and not self.layers_to_transform:
            errors.append("`layers_pattern` needs `layers_to_transform` (the indices of the layers to mask)")
        if layers is not None and isinstance(self.target_modules, str):
            errors.append("`layers_to_transform` cannot be used when `target_modules` is a str (a regex)")
        task_types = [t.value for t in TaskType]
        if self.task_type is not None and self.task_type not in task_types:
            errors.append(f"`task_type` must be None or one of {task_types}, got {self.task_type!r}")
        return [e for e in errors if e]
