"""Dropout schedules and run-time dropout setting.

"To Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis" (Xue et al. 2023,
https://arxiv.org/abs/2305.13230) finds dropout the one regularizer that reliably reduces multi-epoch degradation,
and that it can be switched on late in training or ramped up. This module holds the schedule math
([`scheduled_dropout_rate`]) and the helper that applies a rate to a model at run time ([`set_dropout`]).

A model's dropout probabilities live in three places, and [`set_dropout`] can set all of them:

- `"modules"`: every `torch.nn.Dropout`-family module (`nn.Dropout`, `nn.Dropout1d/2d/3d`, `nn.AlphaDropout`, ...),
  through its `p`. This includes peft's `lora_dropout` modules. Modules that a model replaced by `nn.Identity` because
  their rate was 0 at construction (peft `lora_dropout=0`, GPT-2's `summary_first_dropout`) cannot be switched on.
- `"attributes"`: float attributes copied from the config at construction and read in `forward`, such as
  `LlamaAttention.attention_dropout` (`dropout=0.0 if not self.training else self.attention_dropout`).
- `"config"`: dropout fields of every `PretrainedConfig` reachable from the model's modules, for models that read
  `self.config.<field>` in `forward` (e.g. `config.dropout`, `config.attention_dropout`). Fields that are `None`
  (e.g. `classifier_dropout=None`, meaning "use hidden_dropout_prob") are left alone.

A name counts as a dropout probability when it contains `"dropout"` or ends in `"pdrop"` (GPT-2's `attn_pdrop`,
`resid_pdrop`, `embd_pdrop`) and its value is a number in [0, 1] (not a bool). Stochastic depth (`drop_path_rate`,
`DropPath.drop_prob`) and LayerDrop (`layerdrop`) are not dropout and are not touched.

Every place also has a *type* ([`dropout_type`], one of [`DROPOUT_TYPES`]), so that rates can be set per type:
`"attention"` (dropout on attention probabilities), `"hidden"` (residual / feed-forward dropout, the default),
`"embedding"` (dropout on the input embeddings), `"classifier"` (dropout before a task head) and `"lora"` (peft's
`lora_dropout`). Decoder-only models such as Llama have no hidden or embedding dropout at all;
[`add_hidden_dropout`] adds it (GPT-2/T5-style residual dropout) without changing the state dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from ._checks import is_int, is_rate, raise_field_errors, str_subset


DROPOUT_SCHEDULE_MODES = ("constant", "linear", "step")
DROPOUT_KINDS = ("modules", "attributes", "config")
DROPOUT_TYPES = ("attention", "hidden", "embedding", "classifier", "lora")
"""The dropout types a model's dropout places are sorted into (see [`dropout_type`])."""

# (type, substrings of the lower-cased attribute name), tried in order before the owner's class name
_NAME_RULES = (
    ("lora", ("lora",)),
    ("attention", ("attn", "attention")),
    ("embedding", ("emb",)),
    ("classifier", ("classif", "summary", "head", "pooler")),
    ("hidden", ("resid", "hidden", "activation", "ffn", "mlp")),
)
_HEAD_CLASS = re.compile(r"For[A-Z]|Head|Pooler|Classif|Summary")


def scheduled_dropout_rate(
    step: int,
    p: float,
    mode: str = "constant",
    start_p: float = 0.0,
    start_step: int = 0,
    end_step: int | None = None,
) -> float:
    """
    Return the dropout probability at optimizer step `step` (0-based: the rate used while computing update `step+1`).

    - `"constant"`: `p` at every step.
    - `"step"`: `start_p` before `start_step`, `p` from `start_step` on ("dropout switched on at step k" when
      `start_p=0`).
    - `"linear"`: `start_p` up to `start_step`, then a linear ramp reaching `p` at `end_step`, and `p` afterwards:
      `start_p + (p - start_p) * (step - start_step) / (end_step - start_step)`.

    Args:
        step (`int`): the optimizer step (`TrainerState.global_step`), >= 0.
        p (`float`): the target rate, in [0, 1).
        mode (`str`, defaults to `"constant"`): one of `"constant"`, `"linear"`, `"step"`.
        start_p (`float`, defaults to `0.0`): the rate before the schedule starts (`"linear"`, `"step"`).
        start_step (`int`, defaults to `0`): where the ramp starts (`"linear"`) or the switch happens (`"step"`).
        end_step (`int`, *optional*): where the ramp reaches `p` (`"linear"` only; must be > `start_step`).

    Returns:
        `float`: the dropout probability.
    """
    errors = []
    if not isinstance(mode, str) or mode not in DROPOUT_SCHEDULE_MODES:
        errors.append(f"`mode` must be one of {list(DROPOUT_SCHEDULE_MODES)}, got {mode!r}")
    if not is_int(step) or step < 0:
        errors.append(f"`step` must be an integer >= 0, got {step!r}")
    for field, value in (("p", p), ("start_p", start_p)):
        if not is_rate(value):
            errors.append(f"`{field}` must be a number in [0, 1], got {value!r}")
    if not is_int(start_step) or start_step < 0:
        errors.append(f"`start_step` must be an integer >= 0, got {start_step!r}")
    if mode == "linear" and (not is_int(end_step) or (is_int(start_step) and end_step <= start_step) or end_step < 0):
        errors.append(
            f"`end_step` must be given and > `start_step` ({start_step!r}) for mode='linear', got {end_step!r}"
        )
    elif mode != "linear" and end_step is not None and not is_int(end_step):
        errors.append(f"`end_step` must be None or an integer, got {end_step!r}")
    raise_field_errors("scheduled_dropout_rate", errors)
    if mode == "constant":
        return float(p)
    if mode == "step":
        return float(p) if step >= start_step else float(start_p)
    if step <= start_step:
        return float(start_p)
    if step >= end_step:
        return float(p)
    return float(start_p + (p - start_p) * (step - start_step) / (end_step - start_step))


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or name.endswith("pdrop")


def _is_rate(value: Any) -> bool:
    return is_rate(value)


def dropout_type(name: str, path: str = "", owner_class: str | None = None) -> str:
    """
    Classify one dropout place as one of [`DROPOUT_TYPES`], from names only (a pure function).

    The rules, in order:

    1. `"lora"` when `path` goes through a `lora_dropout` container (peft's `lora_dropout.<adapter>` modules).
    2. The attribute `name` (lower-cased): `attn`/`attention` -> `"attention"` (`attn_dropout`, `attention_dropout`,
       `attention_probs_dropout_prob`, `attn_pdrop`); `emb` -> `"embedding"` (`embd_pdrop`, `embedding_dropout`);
       `classif`/`summary`/`head`/`pooler` -> `"classifier"`; `resid`/`hidden`/`activation`/`ffn`/`mlp` ->
       `"hidden"`.
    3. The class name of the module that owns the place (`owner_class`; `None` for config fields): a task model or
       head (`...For<Task>`, `...Head`, `...Pooler`, `...Classif...`, `...Summary`) -> `"classifier"`;
       `...Embedding...` -> `"embedding"`; `...Attention` -> `"attention"` (BERT's `BertSelfAttention.dropout`,
       T5's and BART's `*Attention.dropout`; not `T5Layer*Attention.dropout`, the residual dropout of the block); a stack (`...Model`, `...Stack`, `...Encoder`, `...Decoder`) ->
       `"embedding"` (GPT-2's `transformer.drop`, BART's `encoder.dropout`, T5's `encoder.dropout`, which drop the
       embeddings).
    4. Otherwise `"hidden"` (BERT's `*Output.dropout`, GPT-2's `mlp.dropout`, `config.dropout`, `dropout_rate`).

    Args:
        name (`str`): the attribute name (`"dropout"`, `"attn_dropout"`, `"attention_dropout"`, ...); for a dropout
            module, the name it has in its parent module.
        path (`str`, defaults to `""`): the dotted module path of the place (e.g. `"model.layers.0.mlp.dropout"`).
        owner_class (`str`, *optional*): the class name of the module that holds the attribute or the dropout module.

    Returns:
        `str`: one of [`DROPOUT_TYPES`].
    """
    errors = [
        f"`{field}` must be a string, got {value!r}"
        for field, value in (("name", name), ("path", path))
        if not isinstance(value, str)
    ]
    if owner_class is not None and not isinstance(owner_class, str):
        errors.append(f"`owner_class` must be None or a class name (a string), got {owner_class!r}")
    raise_field_errors("dropout_type", errors)
    if "lora_dropout" in path.split("."):
        return "lora"
    lowered = name.lower()
    for type_, keys in _NAME_RULES:
        if any(key in lowered for key in keys):
            return type_
    if owner_class:
        if _HEAD_CLASS.search(owner_class):
            return "classifier"
        if "Embedding" in owner_class:
            return "embedding"
        if owner_class.endswith("Attention") and "Layer" not in owner_class:  # not T5LayerSelfAttention's residual
            return "attention"
        if owner_class.endswith(("Model", "Stack", "Encoder", "Decoder")):
            return "embedding"
    return "hidden"


def _check_types(types: Iterable[str], errors: list[str]) -> tuple[str, ...]:
    checked = str_subset(types, DROPOUT_TYPES)
    if checked is None:
        errors.append(f"`types` must be a non-empty subset of {list(DROPOUT_TYPES)}, got {types!r}")
    return checked or ()


def _check_kinds(kinds: Iterable[str], errors: list[str]) -> tuple[str, ...]:
    checked = str_subset(kinds, DROPOUT_KINDS)
    if checked is None:
        errors.append(f"`kinds` must be a non-empty subset of {list(DROPOUT_KINDS)}, got {kinds!r}")
    return checked or ()


def _check_model(model: Any, errors: list[str]) -> None:
    if not isinstance(model, nn.Module):
        errors.append(f"`model` must be a torch.nn.Module, got {type(model).__name__}")


def typed_dropout_sites(model: nn.Module, kinds: Iterable[str] = DROPOUT_KINDS) -> list[tuple[object, str, str]]:
    """
    Find every place a dropout probability of `model` lives, with its type: `(object, attribute_name, type)` triples.

    Like [`dropout_sites`], with the [`dropout_type`] of each place. A config shared by several modules appears once.
    """
    errors: list[str] = []
    _check_model(model, errors)
    kinds = _check_kinds(kinds, errors)
    raise_field_errors("typed_dropout_sites", errors)
    sites: list[tuple[object, str, str]] = []
    seen: set[tuple[int, str]] = set()

    def add(obj: object, name: str, type_: str) -> None:
        key = (id(obj), name)
        if key not in seen:
            seen.add(key)
            sites.append((obj, name, type_))

    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in model.named_modules():
        if "modules" in kinds and isinstance(module, nn.modules.dropout._DropoutNd):
            parent_path, _, child_name = path.rpartition(".")
            parent = modules.get(parent_path) if path else None
            owner = type(parent).__name__ if parent is not None else None
            add(module, "p", dropout_type(child_name, path, owner))
        if "attributes" in kinds:
            for name, value in vars(module).items():
                if not name.startswith("_") and _is_dropout_name(name) and _is_rate(value):
                    add(module, name, dropout_type(name, f"{path}.{name}" if path else name, type(module).__name__))
        if "config" in kinds:
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "to_dict") and not isinstance(config, dict):
                for name, value in vars(config).items():
                    if not name.startswith("_") and _is_dropout_name(name) and _is_rate(value):
                        add(config, name, dropout_type(name))
    return sites


def dropout_sites(
    model: nn.Module, kinds: Iterable[str] = DROPOUT_KINDS, types: Iterable[str] = DROPOUT_TYPES
) -> list[tuple[object, str]]:
    """
    Find every place a dropout probability of `model` lives, as `(object, attribute_name)` pairs.

    Compute this once and pass it to [`set_dropout`] as `sites=` when setting a rate at every step: it walks all
    modules, which costs more than setting a few attributes.

    Args:
        model (`torch.nn.Module`): any module (a transformers model, a peft model, a plain torch model).
        kinds (`Iterable[str]`, defaults to all): a subset of `("modules", "attributes", "config")`, see the module
            docstring.
        types (`Iterable[str]`, defaults to all): a subset of [`DROPOUT_TYPES`] (`"attention"`, `"hidden"`,
            `"embedding"`, `"classifier"`, `"lora"`); see [`dropout_type`].

    Returns:
        `list[tuple[object, str]]`: `(module, "p")` for dropout modules, `(module, name)` for float attributes and
        `(config, name)` for config fields. Each object/name pair appears once.
    """
    errors: list[str] = []
    _check_model(model, errors)
    _check_kinds(kinds, errors)
    types = _check_types(types, errors)
    raise_field_errors("dropout_sites", errors)
    return [(obj, name) for obj, name, type_ in typed_dropout_sites(model, kinds) if type_ in types]


def set_dropout(
    model: nn.Module | None,
    p: float,
    kinds: Iterable[str] = DROPOUT_KINDS,
    sites: list[tuple[object, str]] | None = None,
    types: Iterable[str] = DROPOUT_TYPES,
) -> int:
    """
    Set every dropout probability of `model` to `p` at run time (see the module docstring for what is covered).

    Example:

    ```py
    >>> from regtune.functional.dropout import set_dropout
    >>> n = set_dropout(model, 0.1)  # nn.Dropout modules, attention_dropout attributes, config fields
    >>> n = set_dropout(model, 0.0, kinds=("modules",))  # only nn.Dropout modules
    >>> n = set_dropout(model, 0.05, types=("lora",))  # only peft's lora_dropout
    ```

    Args:
        model (`torch.nn.Module`, *optional*): the model; ignored when `sites` is given.
        p (`float`): the dropout probability, in [0, 1].
        kinds (`Iterable[str]`, defaults to all): a subset of `("modules", "attributes", "config")`.
        sites (`list[tuple[object, str]]`, *optional*): precomputed [`dropout_sites`], to skip the module walk.
        types (`Iterable[str]`, defaults to all): a subset of [`DROPOUT_TYPES`]; ignored when `sites` is given.

    Returns:
        `int`: the number of places set (0 means the model has no dropout that can be set: warn the user).
    """
    errors = []
    if not _is_rate(p):
        errors.append(f"`p` must be a number in [0, 1], got {p!r}")
    if sites is None:
        if model is None:
            errors.append("`model` or `sites` must be given")
        else:
            _check_model(model, errors)
        _check_kinds(kinds, errors)
        _check_types(types, errors)
    elif not isinstance(sites, (list, tuple)) or not all(
        isinstance(site, tuple) and len(site) == 2 and isinstance(site[1], str) for site in sites
    ):
        errors.append("`sites` must be a list of (object, attribute name) pairs (from `dropout_sites`)")
    raise_field_errors("set_dropout", errors)
    if sites is None:
        sites = dropout_sites(model, kinds, types)
    for obj, name in sites:
        setattr(obj, name, float(p))
    return len(sites)


def get_dropout_values(sites: list[tuple[object, str]]) -> list[float]:
    """Return the current value at each of `sites` (e.g. to restore them later with [`restore_dropout`])."""
    return [getattr(obj, name) for obj, name in sites]


def restore_dropout(sites: list[tuple[object, str]], values: list[float]) -> None:
    """Put back the `values` recorded by [`get_dropout_values`] at `sites`."""
    for (obj, name), value in zip(sites, values):
        setattr(obj, name, value)


HIDDEN_DROPOUT_NAME = "residual_dropout"
EMBEDDING_DROPOUT_NAME = "embedding_dropout"


def _drop_output(module: nn.Module, args: tuple, output: Any) -> Any:
    dropout = getattr(module, HIDDEN_DROPOUT_NAME)
    if isinstance(output, tuple):  # attention modules return (attn_output, attn_weights, ...)
        return (dropout(output[0]), *output[1:])
    return dropout(output)


def _drop_embedding(module: nn.Module, args: tuple, output: Any) -> Any:
    return getattr(module, EMBEDDING_DROPOUT_NAME)(output)


class HiddenDropoutHandle:
    """What [`add_hidden_dropout`] added to a model; `remove()` takes it all out again."""

    def __init__(self):
        self.modules: list[tuple[nn.Module, str]] = []
        self._hooks = []

    def remove(self) -> None:
        """Remove the forward hooks and the added `nn.Dropout` modules."""
        for hook in self._hooks:
            hook.remove()
        for owner, name in self.modules:
            delattr(owner, name)
        self._hooks, self.modules = [], []


def add_hidden_dropout(
    model: nn.Module,
    p: float = 0.0,
    embedding_p: float | None = None,
    sublayers: Iterable[str] = ("self_attn", "mlp"),
    embedding: bool = True,
) -> HiddenDropoutHandle:
    """
    Add residual ("hidden") and embedding dropout to a model that has none, such as Llama, Mistral, Qwen2 or Gemma.

    Decoder-only models of the Llama family only have dropout on the attention probabilities (`attention_dropout`,
    usually 0). GPT-2 and T5, and the models of "To Repeat or Not To Repeat", also drop the output of every attention
    and feed-forward block before it is added to the residual stream, and the input embeddings. This adds exactly
    that: an `nn.Dropout` child named `residual_dropout` on every module whose attribute name is in `sublayers`
    (Llama's `self_attn` and `mlp`), applied to its output by a forward hook, and an `embedding_dropout` child on the
    input embeddings. `nn.Dropout` has no parameters or buffers, so the state dict, `save_pretrained` and the config
    are unchanged; the places are found by [`dropout_sites`] with types `"hidden"` and `"embedding"`, so a
    [`~regtune.regularizers.DropoutSchedule`] sets them. Dropout is active in `train()` mode only, like any
    `nn.Dropout`.

    Example:

    ```py
    >>> model = LlamaForCausalLM(LlamaConfig(...))
    >>> handle = add_hidden_dropout(model, p=0.0)  # sites for a schedule to switch on
    >>> trainer = Trainer(model, args, callbacks=[DropoutScheduleCallback(p=0.1, mode="step", start_fraction=0.5)])
    >>> handle.remove()  # optional: take the dropout out again
    ```

    Args:
        model (`torch.nn.Module`): the model (a transformers model, possibly inside a peft model).
        p (`float`, defaults to `0.0`): the rate of the residual dropout, in [0, 1].
        embedding_p (`float`, *optional*): the rate of the embedding dropout; defaults to `p`.
        sublayers (`Iterable[str]`, defaults to `("self_attn", "mlp")`): attribute names of the blocks whose output
            is dropped.
        embedding (`bool`, defaults to `True`): whether to add dropout on the output of `model.get_input_embeddings()`.

    Returns:
        [`HiddenDropoutHandle`]: the added modules; call `.remove()` to undo.

    Raises:
        `ValueError`: for a rate outside [0, 1], when no module is named in `sublayers`, or when the model already has
            this dropout.
    """
    errors: list[str] = []
    _check_model(model, errors)
    embedding_p = p if embedding_p is None else embedding_p
    for field, value in (("p", p), ("embedding_p", embedding_p)):
        if not _is_rate(value):
            errors.append(f"`{field}` must be a number in [0, 1], got {value!r}")
    if (
        isinstance(sublayers, (str, bytes))
        or not isinstance(sublayers, Iterable)
        or not (sublayers := tuple(sublayers))
        or not all(isinstance(name, str) and name for name in sublayers)
    ):
        errors.append(f"`sublayers` must be a non-empty list of attribute names, got {sublayers!r}")
    if not isinstance(embedding, bool):
        errors.append(f"`embedding` must be True or False, got {embedding!r}")
    raise_field_errors("add_hidden_dropout", errors)
    targets = [module for name, module in model.named_modules() if name and name.rsplit(".", 1)[-1] in sublayers]
    if not targets:
        raise ValueError(
            f"add_hidden_dropout: {type(model).__name__} has no module named {list(sublayers)}; pass the attribute "
            "names of its attention and feed-forward blocks as `sublayers`."
        )
    embeddings = model.get_input_embeddings() if embedding and hasattr(model, "get_input_embeddings") else None
    if embedding and embeddings is None:
        raise ValueError(f"add_hidden_dropout: {type(model).__name__} has no `get_input_embeddings()`.")
    if any(hasattr(module, HIDDEN_DROPOUT_NAME) for module in targets) or hasattr(embeddings, EMBEDDING_DROPOUT_NAME):
        raise ValueError("add_hidden_dropout: the model already has hidden dropout (remove it with the handle first).")
    handle = HiddenDropoutHandle()
    for module in targets:
        module.add_module(HIDDEN_DROPOUT_NAME, nn.Dropout(float(p)))
        handle.modules.append((module, HIDDEN_DROPOUT_NAME))
        handle._hooks.append(module.register_forward_hook(_drop_output))
    if embeddings is not None:
        embeddings.add_module(EMBEDDING_DROPOUT_NAME, nn.Dropout(float(embedding_p)))
        handle.modules.append((embeddings, EMBEDDING_DROPOUT_NAME))
        handle._hooks.append(embeddings.register_forward_hook(_drop_embedding))
    return handle
