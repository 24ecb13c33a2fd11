"""regtune's peft adapter types. Importing this package registers them with peft; `regtune` re-exports their
public classes."""

from . import allora, glad, mask_tuning  # noqa: F401 (each registers its adapter type)
