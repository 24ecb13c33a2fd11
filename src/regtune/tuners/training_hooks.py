"""
What an adapter type asks of the trainers that train it, registered by the adapter itself.

regtune's trainer mixin is generic: it knows no adapter type. An adapter type that needs something from the trainer
registers it here when its package is imported:

- `checkpoint_context()`: a context manager entered while the trainer writes a checkpoint (mask tuning stores its
  real-valued scores there instead of the published bit-packed masks, so that a resumed run continues exactly);
- `regularizers(model, given)`: regularizers the trainer adds on its own for `model` (ALLoRA's c/eta diagnostics);
- `prepare_optimizer(optimizer, model)`: called on the optimizer the trainer builds itself (ALLoRA's update-side
  coefficient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterTrainingHooks:
    """The trainer hooks of one adapter type (each optional); see the module docstring."""

    name: str
    checkpoint_context: Callable[[], contextlib.AbstractContextManager] | None = None
    regularizers: Callable[[Any, list], list] | None = None
    prepare_optimizer: Callable[[Any, Any], None] | None = None


_HOOKS: dict[str, AdapterTrainingHooks] = {}


def register_training_hooks(hooks: AdapterTrainingHooks) -> None:
    """Register (or replace, on re-import) the trainer hooks of one adapter type."""
    _HOOKS[hooks.name] = hooks


@contextlib.contextmanager
def checkpoint_context():
    """Every registered adapter type's checkpoint context, entered together."""
    with contextlib.ExitStack() as stack:
        for hooks in _HOOKS.values():
            if hooks.checkpoint_context is not None:
                stack.enter_context(hooks.checkpoint_context())
        yield


def automatic_regularizers(model, given: list) -> list:
    """The regularizers the registered adapter types add for `model`, given the trainer's own `given` list."""
    return [reg for hooks in _HOOKS.values() if hooks.regularizers for reg in hooks.regularizers(model, given)]


def prepare_optimizer(optimizer, model) -> None:
    """Let every registered adapter type prepare an optimizer that a regtune trainer built for `model`."""
    for hooks in _HOOKS.values():
        if hooks.prepare_optimizer is not None:
            hooks.prepare_optimizer(optimizer, model)
