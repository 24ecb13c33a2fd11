"""Validation of recipe sections, every error under its key path.

regtune's own sections are pydantic models ([`SectionModel`], `extra="forbid"`, strict types), read by
[`check_model`]; the sections that configure a host class (`TrainingArguments`, peft configs, `GARDOConfig`) are
checked key by key against the dataclass's fields and annotations by [`check_mapping`], then built, so that the
host's own checks run too.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import Errors, join_path, suggest, unknown_key


class SectionModel(BaseModel):
    """Base of regtune's own recipe sections: unknown keys are errors, and types are not coerced (`"8"` is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


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
            loc = [p for p in error["loc"] if isinstance(p, int) or not (p in _TAGS or any(c in p for c in "[],-"))]
            by_path.setdefault(functools.reduce(join_path, loc, path), []).append(error)
        for key_path, found in by_path.items():
            if not any(p.startswith((f"{key_path}[", f"{key_path}.")) for p in by_path):  # the deepest error wins
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
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence) or annotation in (list, tuple):
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


_PLAIN = (bool, int, float, str, type(None))
_TAGS = {"bool", "int", "float", "str", "none", "list", "dict", "tuple"}


def _loose(annotation):
    """
    The annotation that pydantic checks a host field's value against: an enum (or `Enum | str`) becomes the literal
    of its values, lists accept tuples, and classes pydantic cannot check (torch.dtype, nested configs) any value
    (the host converts or rejects them when built).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _PLAIN:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return typing.Literal[tuple(m.value for m in annotation)]
    if origin is typing.Literal:  # a pattern choice such as peft's 'pissa_niter_[number of iters]' admits any string
        return annotation | str if any(isinstance(c, str) and "[" in c for c in args) else annotation
    if origin in (typing.Union, types.UnionType):
        has_enum = any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args)
        return typing.Union[tuple(_loose(a) for a in args if not (has_enum and a is str))]  # noqa: UP007
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence) or annotation in (list, tuple, set):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1 and Ellipsis not in args:
            return tuple[tuple(_loose(a) for a in items)]
        return collections.abc.Sequence[_loose(items[0]) if items else Any]
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return dict[_loose(args[0]), _loose(args[1])] if args else dict
    return Any


@functools.cache
def _model(name: str, fields: tuple[tuple[str, Any, tuple], ...]) -> type[SectionModel]:
    """A pydantic model with the (name, annotation, bounds) `fields`, all optional (defaults are not checked)."""
    spec = {key: (Annotated[ann, Field(**dict(bounds))] if bounds else ann, None) for key, ann, bounds in fields}
    return create_model(name, __base__=SectionModel, **spec)


def _host_fields(target, exclude=(), ranges=None) -> tuple[tuple[str, Any, tuple], ...]:
    """The checkable init fields of a dataclass, or the keyword parameters of a callable, with their bounds."""
    try:
        hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else _init_of(target))
    except Exception:  # an unresolvable forward reference: check the keys, not the types
        hints = {}
    if dataclasses.is_dataclass(target):
        found = [(f.name, dict(f.metadata)) for f in dataclasses.fields(target) if f.init]
    else:
        params = inspect.signature(_init_of(target)).parameters.values()
        found = [(p.name, {}) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = []
    for name, meta in found:
        if name in exclude or name.startswith("_") or name == "self":
            continue
        meta.update((ranges or {}).get(name, {}))
        annotation = _loose(hints.get(name, Any))
        choices = meta.get("choices")
        if choices is not None:
            annotation = typing.Literal[tuple(choices() if callable(choices) else choices)] | None
        out.append((name, annotation, tuple((k, meta[k]) for k in ("ge", "gt", "le", "lt") if k in meta)))
    return tuple(out)


def _init_of(target):
    return target.__init__ if isinstance(target, type) else target


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
    Check the mapping `data` against the init fields of dataclass `cls` (or the keyword parameters of a callable)
    with a pydantic model built from their annotations: unknown keys (with close matches), wrong types and values
    out of the `ge`/`gt`/`le`/`lt` bounds of the field metadata or of `ranges` are recorded in `errors` under their
    key path. `forbidden` maps keys that exist but may not be set here to the reason. Returns the known keys' values,
    as written.
    """
    what = what or getattr(cls, "__name__", str(cls))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(path, f"expected a mapping of {what} fields, got {_show(data)}")
        return {}
    for key in [k for k in data if k in (forbidden or {})]:  # in the recipe's order
        errors.add(join_path(path, str(key)), forbidden[key])
    data = {k: v for k, v in data.items() if k not in (forbidden or {})}
    if not dataclasses.is_dataclass(cls):
        try:
            params = inspect.signature(_init_of(cls)).parameters.values()
        except (TypeError, ValueError):
            return dict(data)
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return dict(data)
    model = _model(what, _host_fields(cls, tuple(exclude), ranges))
    check_model(data, model, path, errors, what)
    return {k: v for k, v in data.items() if k in model.model_fields}


def check_value(value, annotation, path: str, errors: Errors, **bounds):
    """Check one value against `annotation` (and `ge`/`gt`/`le`/`lt` `bounds`); returns it unchanged."""
    name = path.rpartition(".")[2]
    model = _model(name, ((name, _loose(annotation), tuple(sorted(bounds.items()))),))
    check_model({name: value}, model, path.rpartition(".")[0], errors)
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
