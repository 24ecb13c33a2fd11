"""Validation of recipe sections, every error under its key path.

regtune's own sections are pydantic models ([`SectionModel`], `extra="forbid"`, strict types), read by
[`check_model`]; the sections that configure a host class (`TrainingArguments`, peft configs, `GARDOConfig`) are
checked key by key against the dataclass's fields and annotations by [`check_mapping`], then built, so that the
host's own checks run too.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import Errors, join_path, suggest, unknown_key


class SectionModel(BaseModel):
    """Base of regtune's own recipe sections: unknown keys are errors, and types are not coerced (`"8"` is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


_PYDANTIC_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected a boolean (true/false)",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}  # fmt: skip


def check_model(data, model: type[SectionModel], path: str, errors: Errors, what: str | None = None):
    """
    Validate the mapping `data` with the pydantic model `model`; record every problem in `errors` under its key path
    (with close matches for unknown keys and choices). Returns the model instance; when invalid, one built from the
    valid keys only (the defaults stand in for the others), so that later checks do not report them again.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(path, f"expected a mapping, got {_show(data)}")
        return model()
    try:
        return model(**data)
    except ValidationError as e:
        by_path: dict[str, list[dict]] = {}
        bad = {error["loc"][0] for error in e.errors() if error["loc"]}
        for error in e.errors():
            loc = [p for p in error["loc"] if isinstance(p, int) or not any(c in p for c in "[],-")]
            key_path = path
            for part in loc:
                key_path = join_path(key_path, part)
            by_path.setdefault(key_path, []).append(error)
        for key_path, found in by_path.items():
            errors.add(key_path, _message(found, model, what))
        return model.model_construct(**{k: v for k, v in data.items() if k in model.model_fields and k not in bad})


def _message(found: list[dict], model, what: str | None) -> str:
    error = found[0]
    kind, value, loc = error["type"], error.get("input"), error["loc"]
    if kind == "extra_forbidden":
        return unknown_key(loc[-1], model.model_fields, what)
    if len(found) > 1 and loc and loc[0] in model.model_fields:  # a union: none of its types matched
        return f"expected {describe(model.model_fields[loc[0]].annotation)}, got {_show(value)}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        listed = ", ".join(repr(c) for c in choices)
        return f"expected one of {listed}, got {_show(value)}.{suggest(value, choices)}"
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return f"must be {sign} {error['ctx'][key]}, got {value!r}"
    if kind == "missing":
        return "required"
    if kind in _PYDANTIC_MESSAGES:
        return f"{_PYDANTIC_MESSAGES[kind]}, got {_show(value)}"
    return error["msg"].removeprefix("Value error, ")


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
            errors.add(key_path, unknown_key(key, fields, what))
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


def fields_named(message: str, fields) -> list[str]:
    """The field names that an error message of a host config mentions (to report it under their key paths)."""
    return [f for f in fields if re.search(rf"(?<![A-Za-z0-9_]){re.escape(f)}(?![A-Za-z0-9_])", message)]


def construct_checked(build, path: str, fields, errors: Errors, what: str) -> None:
    """
    Call `build` (construct a host config or a regularizer: its own checks) and report what it rejects under the key
    paths of the `fields` its message names (else under `path`). Returns the object, or `None` when rejected.
    """
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (any rejection by the host class is the recipe's problem)
        message = f"{what} rejected these values: {e}"
        named = fields_named(str(e), fields)
        for name in named or [None]:
            errors.add(join_path(path, name) if name else path, message)


def check_call_kwargs(fn, kwargs, path: str, errors: Errors, what: str) -> dict:
    """Check `kwargs` against the signature (names and annotated types) of the callable `fn`."""
    if not isinstance(kwargs, dict):
        errors.add(path, f"expected a mapping of keyword arguments, got {kwargs!r}")
        return {}
    if dataclasses.is_dataclass(fn):
        return check_mapping(kwargs, fn, path, errors, what=what)
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return dict(kwargs)
    params.pop("self", None)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    out = {}
    for key, value in kwargs.items():
        key_path = join_path(path, str(key))
        if key not in names:
            errors.add(key_path, unknown_key(key, names, what))
            continue
        out[key] = check_value(value, hints[key], key_path, errors) if key in hints else value
    return out
