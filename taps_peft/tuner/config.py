"""`TAPSConfig`: the settings of one TAPS adapter."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType



@dataclass
class TAPSConfig(PeftConfig):
    """Configuration for [`TAPSModel`] (Task Adaptive Parameter Sharing, Wallingford et al., CVPR 2022).

    Each targeted layer gets a full-size delta ``dW`` (with ``r``: ``dW = (alpha / r) * B @ A``) and a scalar score
    ``s``; the layer computes with ``W = W_base + 1[s >= tau] * dW``. Training penalises ``(lam / L) * sum(|s|)``,
    so a larger ``lam`` keeps more layers shared with the base; TAPS applies the penalty and moves the scores itself
    at every step of any torch optimizer that holds them (``taps_peft.scores``), so a training loop needs no TAPS code.
    Only layers whose score passes ``tau`` are task-specific.

    Example:
        >>> import taps_peft  # registers TAPS with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
        >>> model = get_peft_model(base_model, taps_peft.TAPSConfig(lam=0.5, r=8))  # low-rank deltas  # doctest: +SKIP

    Args:
        target_modules: Modules to gate (list of names/suffixes, or a regex matched against the full name). ``None``
            picks the paper's layers: every Linear/Conv except the classifier head and a ViT patch embedding.
        exclude_modules: Modules never to gate (same forms as ``target_modules``).
        modules_to_save: Extra modules trained and saved in full. ``None`` adds the detected classifier head.
        lam: Sparsity weight of the score penalty; larger shares more layers. Must be >= 0. TAPS applies the
            penalty's gradient itself at every optimizer step (no loss term to add; ``model.taps_penalty()`` is its
            value).
        tau: Gate threshold: a layer is task-specific while its score is >= tau.
        score_init: Initial score of every layer; above ``tau`` so every layer starts active (paper: 0.15).
        score_lr: Step size of the scores: TAPS moves them itself with Adam at this learning rate at every step of
            the optimizer that holds them (times that optimizer's schedule, as a ratio), whatever the optimizer and
            its learning rate (``taps_peft.scores``).
        lam_warmup: Fraction of training over which ``lam`` ramps linearly from 0, so gates are judged on deltas
            that have settled. Needs ``total_step`` (``TAPSTrainer``, ``TAPSCallback`` and ``taps-peft train`` set it);
            without it ``lam`` applies in full, with a warning.
        total_step: Length of training in optimizer steps (as AdaLoRA's ``total_step``), for ``lam_warmup`` and
            ``freeze_gates_at``.
        freeze_gates_at: Fraction of training after which the gates are fixed: the scores stop moving, so no gate
            flips in the last steps while the deltas, norms and head settle on the final choice of layers. Needs
            ``total_step``; ``None`` never fixes them. (``model.freeze_gates()`` fixes them at once and also spares
            closed layers their weight gradient; ``TAPSTrainer`` and ``taps-peft train`` call it at this point.)
        train_norms: Train a task-specific copy of every norm layer (BatchNorm incl. running stats, LayerNorm,
            GroupNorm) and save it with the adapter.
        init_weights: ``True`` starts deltas at zero (the model equals its base). ``False`` draws small random deltas,
            as PEFT's tests expect.
        r: Rank of the deltas: ``None`` (default) gives every gated layer a full-size delta; an int gives each layer
            ``dW = scale * B @ A`` (LoRA's factors and init, under the same score, gate and penalty), except
            grouped/depthwise convs and layers where the factors would not be smaller than the weight, which keep a
            full delta.
        alpha: Scaling of the low-rank deltas, ``alpha / r`` as LoRA's ``lora_alpha / r``. ``None`` (default): each
            layer's scale makes its low-rank delta train at the learning rate a full-size delta trains at
            (``tuner.lowrank.layer_scale``, measured in docs/results.md); LoRA's own scale 1 is ``alpha=r``. Needs
            ``r``.
        budget_layers: At most this many active layers: instead of a fixed ``lam``, training adapts ``lam`` (dual
            ascent, starting from ``lam``) until the active layers fit; the adapted value is kept in ``lam``.
        budget_mib: At most this many MiB of active deltas, handled the same way (both budgets may be set).
        budget_rate: Step of the dual ascent: ``lam += budget_rate * (used / budget - 1)`` per optimizer step.
        save_inactive_deltas: ``save_pretrained`` also writes the deltas of inactive layers (a resumable training
            checkpoint: a gate that reopens keeps its delta). Default: only active deltas, the adapter to ship.
        base_model_info: What the adapter knows of its base (recorded when it is saved: library, architecture, name,
            number of classes, a fingerprint of the base tensors it depends on). Set ``name`` and ``pretrained`` (and for a random init ``seed``, for custom shapes
            ``model_kwargs``, for local weights ``weights``) so the model card can show how to rebuild the base;
            loading onto a base with other weights warns (see ``taps_peft.trust.identity``).
        task_info: What the adapter was trained for, shown in its model card: ``dataset``, ``labels``, ``metrics``.
        weights_digest: Written by ``save_pretrained``: the digest of the ``adapter_model.safetensors`` saved with this
            config and of the config fields that change its outputs (``r``, ``alpha``, ``tau``, ``target_modules``,
            ``exclude_modules``). Loading refuses a config and weights from two different saves, and a config edited
            by hand. Leave it unset.
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
    score_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the scores (any optimizer)."})
    lam_warmup: float = field(default=0.5, metadata={"help": "Fraction of training over which lam ramps from 0."})
    total_step: Optional[int] = field(default=None, metadata={"help": "Training length in optimizer steps."})
    freeze_gates_at: Optional[float] = field(default=0.8, metadata={
        "help": "Fraction of training after which the gates are fixed (the scores stop); None never."})
    train_norms: bool = field(default=True, metadata={"help": "Train and save task-specific norm layers."})
    init_weights: bool = field(default=True, metadata={"help": "Zero deltas (identity); False = random, for tests."})
    r: Optional[int] = field(default=None, metadata={"help": "Rank of each delta (alpha/r * B @ A); None = full."})
    alpha: Optional[float] = field(default=None, metadata={
        "help": "Low-rank scaling alpha / r; None = per layer, so low-rank trains at full deltas' learning rate."})
    budget_layers: Optional[int] = field(default=None, metadata={"help": "At most this many active layers."})
    budget_mib: Optional[float] = field(default=None, metadata={"help": "At most this many MiB of active deltas."})
    budget_rate: float = field(default=0.05, metadata={"help": "Dual-ascent step on lam for the budgets."})
    save_inactive_deltas: bool = field(
        default=False, metadata={"help": "Also save inactive layers' deltas (resumable checkpoints)."}
    )
    base_model_info: Optional[dict] = field(
        default=None, metadata={"help": "The base the adapter was trained on (filled in when saving)."}
    )
    task_info: Optional[dict] = field(default=None, metadata={"help": "dataset, labels, metrics (for the card)."})
    weights_digest: Optional[str] = field(
        default=None, metadata={"help": "Digest of the weights saved with this config (written by save_pretrained)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TAPS
        self.target_modules = _check_names(
            "target_modules", self.target_modules, "None for the default layers, a non-empty list of layer names or "
            "suffixes such as ['qkv', 'fc1'], or one regex", allow_empty=False,
        )
        self.exclude_modules = _check_names(
            "exclude_modules", self.exclude_modules, "None, a list of layer names or suffixes, or one regex",
            allow_empty=True,
        )
        mts = self.modules_to_save
        if mts is not None:
            if not isinstance(mts, (list, tuple, set)) or not all(isinstance(n, str) and n for n in mts):
                raise ValueError(
                    f"TAPSConfig.modules_to_save={mts!r} is invalid: use a list of module names, e.g. "
                    "modules_to_save=['head'], or None for the detected classifier head."
                )
            self.modules_to_save = list(mts)
        for name in _NUMERIC_FIELDS:  # in order: tau before score_init, r before alpha
            object.__setattr__(self, name, self._checked(name, getattr(self, name)))
        for name in ("train_norms", "init_weights", "save_inactive_deltas"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TAPSConfig.{name}={getattr(self, name)!r} is invalid: use True or False.")
        for name in ("base_model_info", "task_info"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"TAPSConfig.{name}={getattr(self, name)!r} is invalid: use a dict or None.")

    def __setattr__(self, name: str, value: Any) -> None:
        """A numeric field set after construction gets the checks of ``__post_init__`` (the same ``ValueError``
        naming field, value and fix), so ``config.r = 0`` or ``config.lam = float('nan')`` is refused when set, not
        found as NaN outputs later. Every other attribute (PEFT sets ``inference_mode``, ``base_model_name_or_path``,
        ...) is set as is; the dataclass ``__init__`` is left to ``__post_init__``."""
        if name in _NUMERIC_FIELDS and _FIELD_NAMES <= self.__dict__.keys():
            value = self._checked(name, value)
            if name == "tau" and self.score_init < value:
                raise ValueError(
                    f"TAPSConfig.tau={value!r} is invalid with score_init={self.score_init} (layers would start "
                    "inactive): use a tau <= score_init, or set score_init >= tau first."
                )
            if name == "r" and value is None and self.alpha is not None:
                raise ValueError(
                    f"TAPSConfig.r=None is invalid with alpha={self.alpha} (alpha scales low-rank deltas): use an "
                    "int >= 1, or set alpha=None first for full-size deltas."
                )
        super().__setattr__(name, value)

    def _checked(self, name: str, value: Any) -> Any:
        """``value`` checked for the numeric field ``name`` (against the other fields where it depends on them) and
        normalised to a Python number; a ``ValueError`` naming field, value and fix otherwise."""
        if name == "alpha" and value is not None and self.r is None:
            raise ValueError(
                f"TAPSConfig.alpha={value!r} is set without r: alpha scales low-rank deltas (alpha / r). "
                "Set r too (e.g. r=8, alpha=16), or leave alpha unset."
            )
        ok, fix = _RULES[name]
        if value is None and "None" in fix:
            return None
        if ok is int:
            return _check_int(name, value, 1, fix)
        return _check_number(name, value, fix.format(tau=self.tau), lambda v: ok(v, self))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """PEFT's ``PeftConfig.from_pretrained``, refusing another method's adapter and a damaged file; the load of its
        weights is then checked against this config and the base (``taps_peft.trust``)."""
        from ..trust.saves import read_config

        return read_config(cls, pretrained_model_name_or_path, subfolder, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``PeftConfig.save_pretrained``, written atomically and bound to the weights beside it by
        ``weights_digest``; within ``PeftModel.save_pretrained`` it also writes the TAPS model card
        (``taps_peft.trust.saves.write_config``)."""
        from ..trust.saves import write_config

        write_config(self, save_directory, **kwargs)


# Each numeric field: its test (``int``: an int >= 1) and the fix a refusal names ("None" in it: None is allowed).
_RULES: dict[str, tuple[Any, str]] = {
    "lam": (lambda v, c: v >= 0, "a finite float >= 0, e.g. lam=0.5"),
    "tau": (lambda v, c: v > 0, "a finite float > 0, e.g. tau=0.1"),
    "score_init": (lambda v, c: v >= c.tau, "a finite float >= tau ({tau}) so layers start active, e.g. 0.15 with tau=0.1"),
    "score_lr": (lambda v, c: v > 0, "a finite float > 0, e.g. score_lr=1e-2"),
    "lam_warmup": (lambda v, c: 0 <= v < 1, "a fraction of training in [0, 1), e.g. lam_warmup=0.5"),
    "total_step": (int, "an int >= 1 (optimizer steps) or None"),
    "freeze_gates_at": (lambda v, c: 0 < v <= 1, "a fraction of training in (0, 1], e.g. freeze_gates_at=0.8, or None"),
    "budget_layers": (int, "an int >= 1 (layers) or None"),
    "budget_mib": (lambda v, c: v > 0, "a float > 0 or None"),
    "budget_rate": (lambda v, c: v > 0, "a float > 0, e.g. 0.05"),
    "r": (int, "an int >= 1 (the rank of each gated delta, e.g. r=8), or None for full-size deltas"),
    "alpha": (lambda v, c: v > 0, "a finite float > 0 (scaling alpha / r), or None for alpha = r"),
}
_NUMERIC_FIELDS = ("lam", "tau", "score_init", "score_lr", "lam_warmup", "total_step", "freeze_gates_at",
                   "budget_layers", "budget_mib", "budget_rate", "r", "alpha")
_FIELD_NAMES = frozenset(f.name for f in fields(TAPSConfig))


def _check_names(name: str, value: object, fix: str, allow_empty: bool) -> Optional[Union[str, set[str]]]:
    """``target_modules`` / ``exclude_modules``: None, one regex, or names (a list becomes a set, as in PEFT)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"TAPSConfig.{name}={value!r} is invalid (not a regex: {err}): use {fix}.") from None
        if value or allow_empty:
            return value
    elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        if value or allow_empty:
            return set(value)
    raise ValueError(f"TAPSConfig.{name}={value!r} is invalid: use {fix}.")


def _check_int(name: str, value: object, least: int, fix: str) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise ValueError(f"TAPSConfig.{name}={value!r} is invalid: use {fix}.")
    return int(value)


def _check_number(name: str, value: object, fix: str, ok) -> float:
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int too large for a float
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"TAPSConfig.{name}={value!r} is invalid: use {fix}.")
    return number
