"""`TAPSConfig`: the settings of one TAPS adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType


@dataclass
class TAPSConfig(PeftConfig):
    """Configuration for [`TAPSModel`] (Task Adaptive Parameter Sharing, Wallingford et al., CVPR 2022).

    Each targeted layer gets a full-size delta ``dW`` and a scalar score ``s``; the layer computes with
    ``W = W_base + 1[s >= tau] * dW``. Training adds ``(lam / L) * sum(|s|)`` (see ``model.taps_penalty()``), so a
    larger ``lam`` keeps more layers shared with the base. Only layers whose score passes ``tau`` are task-specific.

    Example:
        >>> import taps_peft  # registers TAPS with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP

    Args:
        target_modules: Modules to gate (list of names/suffixes, or a regex matched against the full name). ``None``
            picks the paper's layers: every Linear/Conv except the classifier head and a ViT patch embedding.
        exclude_modules: Modules never to gate (same forms as ``target_modules``).
        modules_to_save: Extra modules trained and saved in full. ``None`` adds the detected classifier head.
        lam: Sparsity weight of the score penalty; larger shares more layers. Must be >= 0.
        tau: Gate threshold: a layer is task-specific while its score is >= tau.
        score_init: Initial score of every layer; above ``tau`` so every layer starts active (paper: 0.15).
        warmup_steps: ``taps_penalty(step)`` returns zero while ``step < warmup_steps``.
        train_norms: Train a task-specific copy of every norm layer (BatchNorm incl. running stats, LayerNorm,
            GroupNorm) and save it with the adapter.
        init_weights: ``True`` starts deltas at zero (the model equals its base). ``False`` draws small random deltas,
            as PEFT's tests expect.
        save_inactive_deltas: ``save_pretrained`` also writes the deltas of inactive layers (a resumable training
            checkpoint: a gate that reopens keeps its delta). Default: only active deltas, the adapter to ship.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to gate; None = every Linear/Conv except head and patch embedding."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to gate."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved in full; None = the detected classifier head."}
    )
    lam: float = field(default=0.5, metadata={"help": "Weight of (lam / L) * sum |s|; larger shares more layers."})
    tau: float = field(default=0.1, metadata={"help": "A layer is task-specific while its score is >= tau."})
    score_init: float = field(default=0.15, metadata={"help": "Initial score; above tau so every layer starts on."})
    warmup_steps: int = field(default=0, metadata={"help": "No penalty for the first warmup_steps steps."})
    train_norms: bool = field(default=True, metadata={"help": "Train and save task-specific norm layers."})
    init_weights: bool = field(default=True, metadata={"help": "Zero deltas (identity); False = random, for tests."})
    save_inactive_deltas: bool = field(
        default=False, metadata={"help": "Also save inactive layers' deltas (resumable checkpoints)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TAPS
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _check_number("lam", self.lam, "a float >= 0, e.g. lam=0.5", lambda v: v >= 0)
        _check_number("tau", self.tau, "a float > 0, e.g. tau=0.1", lambda v: v > 0)
        _check_number(
            "score_init", self.score_init, f"a float >= tau ({self.tau}) so layers start active, e.g. 0.15",
            lambda v: v >= self.tau,
        )
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"TAPSConfig.warmup_steps={self.warmup_steps!r} is invalid: use an int >= 0.")


def _check_number(name: str, value: object, fix: str, ok) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and ok(value)
    if not valid or abs(value) == float("inf"):
        raise ValueError(f"TAPSConfig.{name}={value!r} is invalid: use {fix}.")
