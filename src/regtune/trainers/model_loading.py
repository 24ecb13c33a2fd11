"""trl's constructor conventions for every regtune trainer: `model` as an instance or a Hub id / local path, and
`peft_config=` applied by the trainer."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def host_takes_peft_config(host_init) -> bool:
    """Whether a host trainer's `__init__` (trl's trainers) loads model ids and applies `peft_config` itself."""
    try:
        return "peft_config" in inspect.signature(host_init).parameters
    except (TypeError, ValueError):
        return False


# peft's task types and the transformers auto class that loads a model for each (as peft's AutoPeftModel* do)
TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def load_model(model_id: str, task_type: str | None = None, **model_init_kwargs: Any) -> nn.Module:
    """
    Load `model_id` (a Hub id or a local folder): with the transformers auto class of `task_type` (a peft task
    type, e.g. `"SEQ_CLS"` from the `peft_config`), else with the class its config names (`architectures[0]`): the
    checkpoint says what it is. `model_init_kwargs` go to `from_pretrained` (e.g. `num_labels=4`, `dtype="auto"`).
    """
    import transformers

    task_type = getattr(task_type, "value", task_type)
    if task_type is not None:
        if task_type not in TASK_AUTO_CLASSES:
            raise ValueError(f"`task_type` = {task_type!r} (allowed: {', '.join(TASK_AUTO_CLASSES)}, or None)")
        return getattr(transformers, TASK_AUTO_CLASSES[task_type]).from_pretrained(model_id, **model_init_kwargs)
    config = transformers.AutoConfig.from_pretrained(model_id)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"`model` = {model_id!r}: its config names no transformers model class (`architectures` = "
            f"{architectures!r}); load it yourself (e.g. AutoModelForSequenceClassification.from_pretrained) and "
            "pass the instance"
        )
    if "num_labels" in model_init_kwargs and not model_class.__name__.endswith(("ForSequenceClassification",
                                                                                 "ForTokenClassification")):  # fmt: skip
        raise ValueError(
            f"`model` = {model_id!r} is a {model_class.__name__} (its config's `architectures`), which has no "
            "classification head for `num_labels`: pass a peft_config with task_type='SEQ_CLS' (or 'TOKEN_CLS'), or "
            "load the model with AutoModelForSequenceClassification and pass the instance"
        )
    return model_class.from_pretrained(model_id, **model_init_kwargs)


def prepare_model(model: Any, peft_config: Any = None, model_init_kwargs: dict | None = None) -> Any:
    """
    The model a regtune trainer trains, from trl-style arguments: `model` loaded with [`load_model`] when it is a
    string (with the auto class of the `peft_config`'s `task_type`, when it has one), then wrapped by `peft.get_peft_model(model, peft_config)` when a `peft_config` is given (a model that is
    already a `PeftModel` is refused with `peft_config`, as trl does, rather than stacking a second adapter).
    """
    if model_init_kwargs and not isinstance(model, str):
        raise ValueError("`model_init_kwargs` is only used when `model` is a model id or path (a string)")
    if isinstance(model, str):  # the adapter's task type says which head to load, as for peft's AutoPeftModel*
        model = load_model(model, getattr(peft_config, "task_type", None), **(model_init_kwargs or {}))
    if peft_config is None:
        return model
    from peft import PeftConfig, PeftModel, get_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise ValueError(
            f"`peft_config` = {type(peft_config).__name__} (allowed: a peft config, e.g. peft.LoraConfig or "
            "regtune.GLADConfig, or None)"
        )
    if isinstance(model, PeftModel):
        raise ValueError(
            "`peft_config` was given for a model that is already a peft model: pass the base model with "
            "`peft_config`, or the peft model without it"
        )
    if model is None:
        raise ValueError("`peft_config` needs a `model` (an instance, a Hub id or a local path)")
    return get_peft_model(model, peft_config)
