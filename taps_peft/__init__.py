"""taps_peft: Task Adaptive Parameter Sharing (TAPS) as a PEFT method.

``import taps_peft`` registers TAPS with PEFT, so ``peft.get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand TAPS adapters.

Example:
    >>> import taps_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> taps_peft.print_taps_summary(model)  # doctest: +SKIP
"""

import importlib
from typing import Any

from .batchnorm import recalibrate_batchnorm
from .budget import budget_usage
from .hub.card import save_model_card
from .hub.export import export_lora
from .hub.save import push_to_hub, save_adapter
from .report import print_taps_summary, taps_layer_report, taps_summary, taps_training_plan
from .tuner import Conv, Linear, TAPSConfig, TAPSLayer, TAPSModel
from .scores import step_scores
from .trust import BaseModelMismatchWarning
from .tuner.registration import register as _register

_register()


def __getattr__(name: str) -> Any:
    """``taps_peft.training`` on first use, as the docs and warnings write it (it imports Accelerate and the Trainer,
    which ``import taps_peft`` does not need)."""
    if name == "training":
        return importlib.import_module(f"{__name__}.training")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.2.0"
__all__ = [
    "BaseModelMismatchWarning", "Conv", "Linear", "TAPSConfig", "TAPSLayer", "TAPSModel", "budget_usage",
    "export_lora", "print_taps_summary", "push_to_hub", "recalibrate_batchnorm", "save_adapter", "save_model_card",
    "step_scores", "taps_layer_report", "taps_summary", "taps_training_plan",
]
