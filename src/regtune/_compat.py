"""The one place where regtune touches peft's internals: adding members to `peft.PeftType` at runtime.

peft has no public API to extend its closed `PeftType` enum, yet `peft.utils.register_peft_method` requires the
member to exist. We add a real enum member (works on CPython 3.10-3.13: `PeftType.X`, `PeftType("X")`,
`PeftType["X"]`, iteration, JSON) and then register through peft's official function. Nothing else in peft is
patched.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method
from peft.utils.peft_types import PeftType as _PeftTypeEnum


def extend_peft_type(name: str) -> PeftType:
    """Add `name` as a member of `peft.PeftType` (idempotent) and return it."""
    if name in _PeftTypeEnum.__members__:
        return _PeftTypeEnum[name]
    member = str.__new__(_PeftTypeEnum, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = _PeftTypeEnum
    _PeftTypeEnum._member_map_[name] = member
    _PeftTypeEnum._value2member_map_[name] = member
    _PeftTypeEnum._member_names_.append(name)
    type.__setattr__(_PeftTypeEnum, name, member)
    return member


def register_regtune_method(*, name: str, config_cls, model_cls, prefix: str) -> None:
    """Extend `PeftType` with `name.upper()` and register the method with peft (idempotent on re-import)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = extend_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
