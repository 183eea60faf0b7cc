"""The TAPS tuner, laid out like a PEFT tuner folder: ``config`` (TAPSConfig), ``layer`` (the gated layers), ``model``
(TAPSModel, the BaseTuner), ``targets`` (which layers to gate, found from the model) and ``registration``."""

from .config import TAPSConfig
from .layer import Conv, Linear, TAPSLayer
from .model import TAPSModel

__all__ = ["Conv", "Linear", "TAPSConfig", "TAPSLayer", "TAPSModel"]
