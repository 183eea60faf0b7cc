"""taps_peft: Task Adaptive Parameter Sharing (TAPS) as a PEFT method.

``import taps_peft`` registers TAPS with PEFT, so ``peft.get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand TAPS adapters.

Example:
    >>> import taps_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> taps_peft.print_taps_summary(model)  # doctest: +SKIP
"""

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

__version__ = "0.2.0"
__all__ = [
    "BaseModelMismatchWarning", "Conv", "Linear", "TAPSConfig", "TAPSLayer", "TAPSModel", "budget_usage",
    "export_lora", "print_taps_summary", "push_to_hub", "recalibrate_batchnorm", "save_adapter", "save_model_card",
    "step_scores", "taps_layer_report", "taps_summary", "taps_training_plan",
]
