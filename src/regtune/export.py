"""Export regtune adapters to formats that load without regtune: peft's LoRA, or merged weights.

A GLAD adapter *is* a LoRA (GLAD changes how it is trained, not what it computes) and a trained ALLoRA adapter is a
LoRA with scaling 1 and no dropout (`h = W x + B A x`; its row coefficient acts on gradients or updates only).
Both are saved by peft under regtune's own peft types (`"GLAD"`, `"ALLORA"`), which plain peft, vLLM, TGI or
diffusers cannot read. [`export_as_lora`] rewrites them as standard peft LoRA adapters (`"peft_type": "LORA"`) that
give the same outputs. Mask tuning's adapter is a binary mask, not a low-rank update: [`export_merged`] writes the
model with the masks applied to its weights, loadable by `from_pretrained` of its transformers class.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file


__all__ = ["LORA_EXPORTABLE_TYPES", "export_as_lora", "export_merged", "find_adapter_dirs", "lora_config_dict"]

LORA_EXPORTABLE_TYPES = ("LORA", "GLAD", "ALLORA")
"""The peft types whose adapters are exactly a peft LoRA at inference."""

PROVENANCE_FILE = "regtune_export.json"
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PICKLED_WEIGHTS = "adapter_model.bin"


def _lora_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def _check_exportable(peft_type: str) -> None:
    if peft_type not in LORA_EXPORTABLE_TYPES:
        hint = (
            "; a mask-tuning adapter is a binary mask, not a low-rank update: export the merged model instead "
            "(regtune.export_merged, or `regtune export --as merged`)"
            if peft_type == "MASK_TUNING"
            else ""
        )
        raise ValueError(
            f"`peft_type` = {peft_type!r} cannot be exported as a LoRA (allowed: {', '.join(LORA_EXPORTABLE_TYPES)})"
            + hint
        )


def lora_config_dict(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The `adapter_config.json` of a peft LoRA adapter that computes what the adapter described by `config` computes.

    Args:
        config (`dict`):
            The content of an `adapter_config.json` written by peft for a `LORA`, `GLAD` or `ALLORA` adapter.

    Returns:
        `(lora_config, dropped)`: the LoRA config (`peft_type` `"LORA"`; for ALLoRA `lora_alpha = r`, so that
        LoRA's `lora_alpha / r` scaling is 1 as in ALLoRA, and no dropout), and the regtune-only fields it leaves
        out (training settings such as GLAD's `rho` or ALLoRA's `eta`, which do not change the outputs).

    Raises:
        `ValueError`: for any other peft type, naming the exportable types (and `export_merged` for mask tuning).
    """
    peft_type = str(config.get("peft_type"))
    _check_exportable(peft_type)
    fields = _lora_fields()
    lora = {key: value for key, value in config.items() if key in fields}
    dropped = {key: value for key, value in config.items() if key not in fields}
    lora["peft_type"] = "LORA"
    if peft_type == "ALLORA":
        # ALLoRA computes h = W x + B A x: LoRA's scaling lora_alpha / r must be exactly 1, and no rsLoRA
        lora.update(lora_alpha=lora["r"], lora_dropout=0.0, use_rslora=False, alpha_pattern={}, rank_pattern={})
    return lora, dropped


def _write_json(path: str, content: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _export_folder(source: str, destination: str) -> str:
    """Rewrite the adapter saved in `source` (one adapter's folder) as a peft LoRA in `destination`."""
    with open(os.path.join(source, _CONFIG)) as f:
        config = json.load(f)
    lora, dropped = lora_config_dict(config)
    if os.path.isfile(os.path.join(source, _WEIGHTS)):
        weights = load_file(os.path.join(source, _WEIGHTS))
    elif os.path.isfile(os.path.join(source, _PICKLED_WEIGHTS)):
        weights = torch.load(os.path.join(source, _PICKLED_WEIGHTS), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{source}: no {_WEIGHTS} (or {_PICKLED_WEIGHTS}) beside {_CONFIG}")
    os.makedirs(destination, exist_ok=True)
    save_file(weights, os.path.join(destination, _WEIGHTS + ".tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(destination, _WEIGHTS + ".tmp"), os.path.join(destination, _WEIGHTS))
    _write_json(os.path.join(destination, _CONFIG), lora)
    _write_json(
        os.path.join(destination, PROVENANCE_FILE),
        {"exported_from": config.get("peft_type"), "training_settings": dropped},
    )
    return destination


def find_adapter_dirs(path: str) -> list[str]:
    """
    Every folder under `path` (itself included) holding an `adapter_config.json`, sorted: an adapter folder, peft's
    layout for several adapters (`<name>/` beside the default one), a `regtune run` output folder (`<run>/adapter`,
    `<run>/seed-<k>/adapter`) or a recipe's whole output folder.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder")
    found = sorted(root for root, _, files in os.walk(path) if _CONFIG in files)
    if not found:
        raise ValueError(f"{path} holds no peft adapter (no {_CONFIG} in it or below it)")
    return found


def export_as_lora(model_or_path: Any, save_directory: str) -> list[str]:
    """
    Write GLAD, ALLoRA (or LoRA) adapters as standard peft LoRA adapters, loadable by peft, vLLM, TGI or diffusers
    without regtune.

    The weights are copied unchanged (regtune's LoRA-based adapters store peft's `lora_A` / `lora_B` keys); the
    config becomes a `LoraConfig` with the same rank, targets and scaling (`lora_alpha = r` for ALLoRA, which has
    no `alpha / r` factor). regtune's training-only settings (GLAD's `rho`, ALLoRA's `eta`, ...) are recorded in
    `regtune_export.json` beside the adapter.

    Args:
        model_or_path (`peft.PeftModel` or `str`):
            A peft model holding the adapters (every adapter is exported, in peft's layout: the default one at the
            root of `save_directory`, the others in sub-folders), or a folder holding saved adapters (an adapter
            folder, or a `regtune run` output folder: each adapter found is exported under its relative path).
        save_directory (`str`):
            The folder to write.

    Returns:
        `list[str]`: the folders written, one per adapter.

    Example:

        ```py
        >>> import regtune
        >>> regtune.export_as_lora(glad_model, "glad-as-lora")
        >>> # in any process, without regtune:
        >>> from peft import PeftModel
        >>> model = PeftModel.from_pretrained(base_model, "glad-as-lora")
        ```
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        folders = find_adapter_dirs(source)
        for folder in folders:  # check every adapter before writing anything
            with open(os.path.join(folder, _CONFIG)) as f:
                _check_exportable(str(json.load(f).get("peft_type")))
        return [
            _export_folder(folder, os.path.join(save_directory, os.path.relpath(folder, source))) for folder in folders
        ]
    if not hasattr(model_or_path, "peft_config") or not hasattr(model_or_path, "save_pretrained"):
        raise TypeError(
            f"model_or_path: expected a peft.PeftModel or a folder path, got {type(model_or_path).__name__}"
        )
    for config in model_or_path.peft_config.values():  # refuse before writing anything
        _check_exportable(str(getattr(config.peft_type, "value", config.peft_type)))
    with tempfile.TemporaryDirectory() as staging:
        model_or_path.save_pretrained(staging)
        return [
            _export_folder(folder, os.path.normpath(os.path.join(save_directory, os.path.relpath(folder, staging))))
            for folder in find_adapter_dirs(staging)
        ]


def export_merged(model: Any, save_directory: str, *, inplace: bool = False) -> str:
    """
    Write the model with its adapter merged into the weights (`merge_and_unload`), as plain transformers (or
    diffusers) weights loadable by the base model's class, without peft or regtune. The way to serve a mask-tuning
    adapter (its masks multiply the frozen weights; merging is exact); it works for every adapter type.

    Args:
        model (`peft.PeftModel`):
            The model with its adapter.
        save_directory (`str`):
            The folder to write (`save_pretrained` of the merged model, safetensors).
        inplace (`bool`, defaults to `False`):
            Merge `model` itself (it is then the merged base model and no longer a peft model), instead of a copy
            (which needs the memory of a second model).

    Returns:
        `str`: `save_directory`.
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"model: expected a peft.PeftModel with an adapter, got {type(model).__name__}")
    merged = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    merged.save_pretrained(save_directory, safe_serialization=True)
    return save_directory


def _base_model_class(config: dict[str, Any]):
    """The class to load an adapter's base model with: the one peft recorded (`auto_mapping`), else the transformers
    auto class of its `task_type`, as peft's `AutoPeftModel*` classes do."""
    import importlib

    import transformers

    mapping = config.get("auto_mapping") or {}
    if mapping.get("base_model_class") and mapping.get("parent_library"):
        return getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"])
    name = {
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }.get(config.get("task_type"), "AutoModel")
    return getattr(transformers, name)


def export_saved_merged(adapter_dir: str, save_directory: str, base_model: str | None = None) -> str:
    """
    [`export_merged`] for an adapter saved on disk: loads its base model (`base_model`, else the
    `base_model_name_or_path` of its `adapter_config.json`) with the transformers auto class of its `task_type`,
    applies the adapter, merges and writes the merged model to `save_directory`.
    """
    from peft import PeftModel  # regtune's peft types are registered: this module is part of regtune

    with open(os.path.join(adapter_dir, _CONFIG)) as f:
        config = json.load(f)
    base_model = base_model or config.get("base_model_name_or_path")
    if not base_model:
        raise ValueError(
            f"{adapter_dir}/{_CONFIG} names no base model (`base_model_name_or_path`): pass the base model"
        )
    base = _base_model_class(config).from_pretrained(base_model)
    return export_merged(PeftModel.from_pretrained(base, adapter_dir), save_directory, inplace=True)
