"""A small validator for recipe data: unknown keys, types and ranges, each error naming its key path.

It checks plain dicts (parsed YAML) against dataclasses -- regtune's own recipe sections, peft config classes,
`transformers.TrainingArguments` -- using their type annotations, and collects every problem before raising one
[`RecipeError`]. Unknown keys and values come with close matches (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from typing import Any

import yaml


class RecipeError(ValueError):
    """
    A recipe is invalid. `errors` is the list of `(key_path, message)` pairs; `str(error)` lists them all.

    Example: `adapter.etaa: unknown key for ALLoRAConfig. Did you mean 'eta'?`
    """

    def __init__(self, errors: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors = list(errors)
        self.source = source
        head = f"Invalid recipe {source}" if source else "Invalid recipe"
        lines = [f"  {path}: {message}" if path else f"  {message}" for path, message in self.errors]
        noun = "error" if len(lines) == 1 else "errors"
        super().__init__(f"{head} ({len(lines)} {noun}):\n" + "\n".join(lines))


class Errors:
    """Collects `(path, message)` pairs; `raise_if_any` raises them as one [`RecipeError`]."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, source: str | None = None) -> None:
        if self.items:
            raise RecipeError(self.items, source)


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def suggest(value: str, choices, n: int = 3) -> str:
    """`" Did you mean 'x'?"` for the closest of `choices` to `value`, or `""`."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def allowed_list(choices, limit: int = 40) -> str:
    choices = sorted(str(c) for c in choices)
    if len(choices) > limit:
        return f"{len(choices)} allowed keys"
    return "allowed: " + ", ".join(choices)


# --------------------------------------------------------------------------------------------------------------------
# YAML: PyYAML reads `1e-3` as a string (YAML 1.1). Recipes are full of learning rates, so read it as a float.

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class RecipeLoader(yaml.SafeLoader):
    """
    `yaml.SafeLoader` with YAML 1.2 scalars: `1e-3` / `5E4` are floats, and only `true` / `false` are booleans, so
    `eval_strategy: no` and `--training.save_strategy=no` are the string `"no"` (YAML 1.1 reads `no` as false).
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse YAML text with [`RecipeLoader`]."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def dump_yaml(data: Any) -> str:
    """Dump plain data as block-style YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=119)


# --------------------------------------------------------------------------------------------------------------------
# Types


def describe(annotation) -> str:
    """A short human name of a type annotation: `int`, `list of str`, `one of 'a', 'b'`, `null`."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any value"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {describe(args[0])}" if args else "list"
    if origin is dict or annotation is dict:
        args = typing.get_args(annotation)
        return f"mapping of {describe(args[0])} to {describe(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if isinstance(annotation, type):
        return {"str": "string", "bool": "boolean", "float": "number", "int": "integer"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


class _Mismatch(Exception):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


_NO_CHECK = object()


def _check(value, annotation, path: str):
    """Return `value` (checked, unchanged) or raise `_Mismatch`."""
    if annotation is Any or annotation is _NO_CHECK or annotation is object:
        return value
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch(path, f"expected null, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
        if enums and str in options and isinstance(value, str):
            # `IntervalStrategy | str` (TrainingArguments): the string must still name a member
            return _check(value, enums[0], path)
        deepest = None
        for option in options:
            try:
                return _check(value, option, path)
            except _Mismatch as mismatch:  # prefer an error from inside a matching container
                if mismatch.path != path and deepest is None:
                    deepest = mismatch
        if deepest is not None:
            raise deepest
        raise _Mismatch(path, f"expected {describe(annotation)}, got {_show(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        if isinstance(value, str) and any(isinstance(c, str) and "[" in c for c in choices):
            return value  # a pattern choice such as peft's 'pissa_niter_[number of iters]'
        raise _Mismatch(
            path,
            f"expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}.{suggest(value, choices)}",
        )
    if origin is typing.ClassVar:
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        values = [m.value for m in annotation]
        if value in values:
            return value
        raise _Mismatch(
            path, f"expected one of {', '.join(repr(v) for v in values)}, got {_show(value)}.{suggest(value, values)}"
        )
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(path, f"expected a boolean (true/false), got {_show(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(path, f"expected an integer, got {_show(value)}")
    if annotation is float:
        if isinstance(value, float) and not math.isfinite(value):
            raise _Mismatch(path, f"expected a finite number, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int (`num_train_epochs: 3` reads back as written)
        raise _Mismatch(path, f"expected a number, got {_show(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(path, f"expected a string, got {_show(value)}")
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(path, f"expected {describe(annotation)}, got {_show(value)}")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(annotation):
            if len(value) != len(args):
                raise _Mismatch(path, f"expected a list of {len(args)} items, got {_show(value)}")
            return [_check(v, a, join_path(path, i)) for i, (v, a) in enumerate(zip(value, args))]
        item = args[0] if args else Any
        return [_check(v, item, join_path(path, i)) for i, v in enumerate(value)]
    if origin is dict or annotation is dict or origin in (typing.Mapping,):
        if not isinstance(value, dict):
            raise _Mismatch(path, f"expected {describe(annotation)}, got {_show(value)}")
        args = typing.get_args(annotation)
        if not args:
            return value
        return {k: _check(v, args[1], join_path(path, str(k))) for k, v in value.items()}
    # Any other class (torch.dtype, a nested config dataclass, ...): the host library converts or checks it.
    return value


def _show(value) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def check_value(value, annotation, path: str, errors: Errors):
    """Check `value` against `annotation`; on mismatch record the error and return `value` unchanged."""
    try:
        return _check(value, annotation, path)
    except _Mismatch as mismatch:
        errors.add(mismatch.path, mismatch.message)
        return value


def check_range(value, meta: dict, path: str, errors: Errors) -> None:
    """Apply `ge`, `gt`, `le`, `lt` bounds from a field's metadata to a number (`None` passes)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b)]
    bounds += [("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    failed = [f"{sign} {meta[key]}" for key, sign, ok in bounds if key in meta and not ok(value, meta[key])]
    if failed:
        wanted = " and ".join(f"{sign} {meta[key]}" for key, sign, _ in bounds if key in meta)
        errors.add(path, f"must be {wanted}, got {value!r}")


def dataclass_fields(cls, exclude=()) -> dict[str, tuple[Any, dataclasses.Field]]:
    """`{name: (annotation, field)}` of the init fields of dataclass `cls` (annotation `_NO_CHECK` if unresolvable)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable forward reference: check the keys, not the types
        hints = {}
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude or f.name.startswith("_"):
            continue
        annotation = hints.get(f.name, f.type if not isinstance(f.type, str) else _NO_CHECK)
        fields[f.name] = (annotation, f)
    return fields


def check_mapping(
    data,
    cls,
    path: str,
    errors: Errors,
    *,
    exclude=(),
    forbidden: dict[str, str] | None = None,
    ranges: dict[str, dict] | None = None,
    what: str | None = None,
) -> dict:
    """
    Check the keys and values of the mapping `data` against the init fields of dataclass `cls`.

    Unknown keys (with close matches), wrong types and values out of the `ge`/`gt`/`le`/`lt` bounds found in the
    field metadata or in `ranges` are recorded in `errors` under their key path. `forbidden` maps keys that exist
    but may not be set here to the reason. Returns the checked mapping.
    """
    what = what or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(path, f"expected a mapping of {what} fields, got {_show(data)}")
        return {}
    fields = dataclass_fields(cls, exclude)
    out = {}
    for key, value in data.items():
        key_path = join_path(path, str(key))
        if forbidden and key in forbidden:
            errors.add(key_path, forbidden[key])
            continue
        if key not in fields:
            hint = suggest(str(key), fields)
            listing = "" if hint else f" ({allowed_list(fields)})"
            errors.add(key_path, f"unknown key for {what}.{hint}{listing}")
            continue
        annotation, f = fields[key]
        value = check_value(value, annotation, key_path, errors)
        meta = dict(f.metadata)
        meta.update((ranges or {}).get(key, {}))
        check_range(value, meta, key_path, errors)
        choices = meta.get("choices")
        if choices is not None and value is not None:
            choices = choices() if callable(choices) else choices
            if value not in choices:
                errors.add(
                    key_path,
                    f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}.{suggest(value, choices)}",
                )
        out[key] = value
    return out
