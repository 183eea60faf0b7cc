"""taps_peft: Task Adaptive Parameter Sharing (TAPS) as a PEFT method.

``import taps_peft`` registers TAPS with PEFT, so ``peft.get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand TAPS adapters.

Example:
    >>> import taps_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
"""

from .hub.export import export_lora
from .training.optim import create_taps_optimizer
from .tuner import Conv, Linear, TAPSConfig, TAPSLayer, TAPSModel
from .tuner.registration import register as _register

_register()

__version__ = "0.1.0"
__all__ = ["Conv", "Linear", "TAPSConfig", "TAPSLayer", "TAPSModel", "create_taps_optimizer", "export_lora"]
