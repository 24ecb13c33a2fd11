"""The one error type of recipes: every problem with its key path, close matches suggested."""

from __future__ import annotations

import difflib


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
        if (path, message) not in self.items:
            self.items.append((path, message))

    def raise_if_any(self, source: str | None = None) -> None:
        if self.items:
            raise RecipeError(self.items, source)


def join_path(path: str, key: str | int | None) -> str:
    if key is None or key == "":
        return path
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def suggest(value, choices, n: int = 3) -> str:
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


def unknown_key(key, allowed, what: str | None = None, label: str = "unknown key") -> str:
    """The message for an unknown key: `unknown key for X. Did you mean 'y'?` (or the allowed keys)."""
    hint = suggest(key, allowed)
    return f"{label}{f' for {what}' if what else ''}.{hint or ' (' + allowed_list(allowed) + ')'}"


def unknown_choice(what: str, value, known, shown=None) -> str:
    """`unknown <what> 'x'. Did you mean 'y'? Known: a, b` (`shown`: the known values as listed, default sorted)."""
    shown = sorted(known) if shown is None else shown
    return f"unknown {what} {value!r}.{suggest(value, known)} Known: {', '.join(shown)}"
