"""Make PEFT know TAPS: add ``PeftType.TAPS`` to PEFT's enum, then call PEFT's public ``register_peft_method``."""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def _add_peft_type(name: str) -> PeftType:
    """Add a member to PEFT's ``PeftType`` str-enum (PEFT refuses to register names missing from it)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Register TAPS with PEFT once per process (importing ``taps_peft`` calls this)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import TAPSConfig
    from .model import TAPSModel

    peft_type = _add_peft_type("TAPS")
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="taps", config_cls=TAPSConfig, model_cls=TAPSModel, prefix=TAPSModel.prefix)
