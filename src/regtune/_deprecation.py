"""One name per knob: the old spellings of a renamed or moved setting keep working for one release, with a
`FutureWarning` that names the new place (docs/regularizers.md, "One name per knob")."""

from __future__ import annotations

import warnings
from typing import Any


REMOVAL = "regtune 0.2"


def renamed_argument(owner: str, old: str, new: str, old_value: Any, new_value: Any) -> tuple[Any, str]:
    """
    `(value, spelling)` of argument `new` of `owner`, given that `old` is its deprecated spelling: `old_value` (with
    a `FutureWarning`) when only the old spelling was given, else `new_value`; `spelling` is the name the caller
    used (for error messages). Both given is a `ValueError`. `None` means "not given".
    """
    if old_value is None:
        return new_value, new
    if new_value is not None:
        raise ValueError(f"{owner}: `{old}` is the deprecated spelling of `{new}`; give only `{new}`.")
    warnings.warn(
        f"{owner}({old}=...) is deprecated and will be removed in {REMOVAL}: use {owner}({new}=...), the name the "
        "trainer arguments and recipes use (one name per knob).",
        FutureWarning,
        stacklevel=3,
    )
    return old_value, old


def training_knob_in_adapter_config(
    owner: str, fields: dict[str, str], values: dict[str, Any], defaults: dict
) -> None:
    """Warn (`FutureWarning`) for each training setting of an adapter config set to a non-default value: adapter
    configs describe the adapter; `fields` maps each such field to its trainer argument."""
    moved = [name for name in fields if values[name] != defaults[name]]
    if moved:
        where = ", ".join(f"`{name}` -> {fields[name]}" for name in moved)
        warnings.warn(
            f"{owner}: training settings in an adapter config are deprecated and will be removed in {REMOVAL} "
            f"(adapter configs describe the adapter, trainer arguments describe training): {where}. Until then the "
            "adapter's values are used where the trainer arguments leave the setting unset.",
            FutureWarning,
            stacklevel=4,
        )
