"""TAPS layers: a frozen base layer plus, per adapter, a gated delta and a score. The delta is full-size (``dW``) or,
with ``TAPSConfig(r=...)``, low-rank (``scale * B @ A``, see ``tuner.lowrank``).

The layer keeps no derived state between calls: every forward forms ``W_base + 1[s >= tau] * dW`` from the parameters
as they are and runs one matmul/conv (timm's ``StdConv2d`` and PEFT's SHiRA layer have the same shape); a low-rank
delta may instead run through the input, ``base(x) + g * scale * B(A(x))``, when that is cheaper. While the gates
learn, the gate is a device tensor (no host read); when they do not, ``TAPSModel`` reads every gate of the model in one
transfer at the start of the forward and hands it to the layers for that forward only, so closed layers run the base
layer unchanged.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import lowrank
from .gated import RecomputeFormedWeight, form_weight, outer_saved_tensors_hooks

if TYPE_CHECKING:
    from .config import TAPSConfig

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor: an FSDP2 parameter outside its module's forward."""
    return hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded parameter gathered (a collective: every rank must call it), anything else as is."""
    return t.full_tensor() if is_sharded(t) else t


def sample_groups(adapter_names: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapter named in a mixed-task batch, with the batch rows of its samples (in order of first use)."""
    for name in dict.fromkeys(adapter_names):
        yield name, torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=device)


def check_batch_names(x: torch.Tensor, adapter_names: list[str]) -> None:
    """PEFT's rule for mixed batches: one adapter name per sample."""
    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )


class TAPSLayer(BaseTunerLayer):
    """State and merge logic shared by every TAPS layer; see [`Linear`] and [`Conv`] for the modules.

    Dtypes follow PEFT's ``autocast_adapter_dtype``: ``True`` (PEFT's default) keeps the deltas of a fp16/bf16 base in
    fp32, as LoRA's weights (small updates accumulate, and fp16 training with a ``GradScaler`` works); ``False`` gives
    them the base dtype (half the memory). A score is always fp32 (0.15 against tau = 0.1 must stay exact), also after
    ``model.half()``. ``layer.weight`` is the weight the layer computes with (``W_base`` plus the open deltas), so a
    parent module that reads it directly (``F.linear(x, self.qkv.weight)`` in timm's EVA, torchvision's Swin,
    ``nn.MultiheadAttention``'s ``out_proj``) computes with the gated weight too. With ``TAPSConfig(r=...)`` an
    adapter's delta in a layer that fits is ``scale * B @ A`` (``taps_A``, ``taps_B``; ``tuner.lowrank``), else the
    full ``taps_delta``.
    """

    adapter_layer_names = ("taps_delta", "taps_A", "taps_B", "taps_scores")
    other_param_names = ("taps_tau", "taps_rank", "taps_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.taps_delta = nn.ParameterDict({})  # full-size deltas
        self.taps_A = nn.ParameterDict({})  # low-rank factors (TAPSConfig(r=...)), for the adapters in taps_rank
        self.taps_B = nn.ParameterDict({})
        self.taps_scores = nn.ParameterDict({})
        self.taps_tau: dict[str, float] = {}
        self.taps_rank: dict[str, int] = {}  # adapters whose delta here is scale * B @ A, with their rank
        self.taps_scaling: dict[str, float] = {}  # alpha / r of those adapters
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_weight: Optional[torch.Tensor] = None  # the base weight's own data while merged
        self._gates: Optional[dict[str, bool]] = None  # host gates, set by TAPSModel for one forward only
        self._routing = False  # a mixed-task batch is running (set by TAPSModel for one forward only)
        base = self.get_base_layer()
        if isinstance(base, _CONV):
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: TAPSConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: a score and a zero delta (small random ones with ``init_weights=False``);
        with ``config.r`` set and a layer that fits (``lowrank.lowrank_fits``), factors A (LoRA's init) and B (zeros)
        instead of the full delta."""
        base = self.get_base_layer()
        weight = base.weight
        for params in (self.taps_delta, self.taps_A, self.taps_B):
            if adapter_name in params:
                del params[adapter_name]
        self.taps_rank.pop(adapter_name, None)
        self.taps_scaling.pop(adapter_name, None)
        if lowrank.lowrank_fits(base, config.r):
            scale = lowrank.layer_scale(weight, config.r, config.alpha)
            a, b = lowrank.init_factors(weight, config.r, scale, random_b=not config.init_weights)
            self.taps_A[adapter_name] = nn.Parameter(a, requires_grad=False)
            self.taps_B[adapter_name] = nn.Parameter(b, requires_grad=False)
            self.taps_rank[adapter_name], self.taps_scaling[adapter_name] = int(config.r), scale
        else:
            if weight.device.type == "meta" or config.init_weights:
                delta = torch.zeros_like(weight)
            else:
                delta = torch.randn_like(weight) * 0.02 * (weight.float().std().item() or 1.0)
            self.taps_delta[adapter_name] = nn.Parameter(delta, requires_grad=False)
        score = torch.full((1,), float(config.score_init), dtype=torch.float32, device=weight.device)
        self.taps_scores[adapter_name] = nn.Parameter(score, requires_grad=False)
        self.taps_tau[adapter_name] = float(config.tau)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapter_params(self, adapter_name: str) -> list[nn.Parameter]:
        """The adapter's parameters in this layer: its delta (or factors A, B) when held, and its score."""
        return [p[adapter_name] for p in (self.taps_delta, self.taps_A, self.taps_B, self.taps_scores)
                if adapter_name in p]

    def has_delta(self, adapter_name: str) -> bool:
        """Whether the layer holds the adapter's delta (full, or both factors); a layer of an adapter loaded for
        inference holds none while closed."""
        return adapter_name in self.taps_delta or (adapter_name in self.taps_A and adapter_name in self.taps_B)

    def delta(self, adapter_name: str) -> torch.Tensor:
        """The adapter's ungated delta: ``dW``, or ``scale * B @ A`` formed in autograd (in the factors' dtype)."""
        if adapter_name in self.taps_delta:
            return self.taps_delta[adapter_name]
        return lowrank.lowrank_delta(self.taps_A[adapter_name], self.taps_B[adapter_name],
                                     self.taps_scaling[adapter_name], self.get_base_layer().weight.shape)

    def delta_numel(self, adapter_name: str) -> int:
        """Elements the adapter's delta takes here (saved when active): the weight's, or the two factors'."""
        weight = self.get_base_layer().weight
        if adapter_name in self.taps_rank:
            return lowrank.factors_numel(weight, self.taps_rank[adapter_name])
        return weight.numel()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, touching only the adapters active before and after (the others are frozen already):
        a switch costs the same with 2 or 50 adapters loaded, the rule PEFT's ``ModulesToSaveWrapper`` follows too."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in dict.fromkeys([*self.active_adapters, *names]):
            for param in self.adapter_params(name):
                param.requires_grad_(name in names and not inference_mode)
        self._active_adapter = names

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Deltas and factors to the base weight's device and dtype (fp32 ones of a 16-bit base stay fp32: PEFT's
        ``autocast_adapter_dtype`` made them so), scores to its device in fp32."""
        weight = self.get_base_layer().weight
        device = device or weight.device
        if device.type == "meta":
            return
        weights = (self.taps_delta, self.taps_A, self.taps_B)
        held = [p[adapter_name] for p in weights if adapter_name in p]
        upcast = any(t.dtype == torch.float32 for t in held) and weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if upcast else weight.dtype
        for params, target in [*((p, dtype) for p in weights), (self.taps_scores, torch.float32)]:
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name].data = params[adapter_name].data.to(device=device, dtype=target)

    def gate(self, adapter_name: str) -> torch.Tensor:
        """``1[s >= tau]`` as a device tensor (no host read)."""
        return self.taps_scores[adapter_name] >= self.taps_tau[adapter_name]

    def is_active(self, adapter_name: str) -> bool:
        """Whether the layer is task-specific for ``adapter_name`` (score >= tau); reads the score on the host."""
        score = full_tensor(self.taps_scores[adapter_name]).detach()
        return bool(score.float().item() >= self.taps_tau[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The gated delta ``1[s >= tau] * dW`` (or ``1[s >= tau] * scale * B @ A``) in the base weight's dtype,
        detached (zeros without a delta)."""
        weight = self.get_base_layer().weight
        if not self.has_delta(adapter_name):
            return torch.zeros_like(weight)
        with torch.no_grad():
            return self.delta(adapter_name).to(weight.dtype) * self.gate(adapter_name).to(weight.dtype)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's ``enable_adapters``; disabling a merged layer also unmerges it, as LoRA's layers do (on their next
        forward; here at once, so that a parent that reads ``layer.weight`` instead of calling the layer, such as
        ``nn.MultiheadAttention`` with its ``out_proj``, computes with the base weight too). As with LoRA, the layer
        stays unmerged when enabled again."""
        if not enabled and self.merged:
            self.unmerge()
        super().enable_adapters(enabled)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the open adapters' deltas to the base weight; its own data is set aside so unmerge is exact."""
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if self.has_delta(name) and self.is_active(name):
                with torch.no_grad():
                    merged = weight.data + self.delta(name).detach().to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                if self._unmerged_weight is None:
                    self._unmerged_weight = weight.data
                weight.data = merged
            if name in self.taps_scores:
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge: the base weight gets its own data back, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._unmerged_weight is not None:
            self.get_base_layer().weight.data = self._unmerged_weight
            self._unmerged_weight = None
        self.merged_adapters.clear()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` / ``save_as_lora`` handle linear layers only (``taps_peft.export_lora`` also
        converts convolutions)."""
        return isinstance(self.get_base_layer(), nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with: ``W_base + 1[s >= tau] * dW`` for the active adapters (through the
        straight-through gate while the gates learn; a low-rank ``dW = scale * B @ A`` formed), the base weight when
        no delta is open. While a delta is open this is a new tensor, not a parameter: write to the base weight through
        ``layer.get_base_layer().weight`` (an in-place write here would change nothing)."""
        base = self.get_base_layer()
        if "taps_scores" not in self._modules or self.disable_adapters or self.merged:
            return base.weight
        if self._routing:
            raise RuntimeError(
                f"A module reads the weight of a TAPS layer ({type(base).__name__} {tuple(base.weight.shape)}) directly "
                "instead of calling it, so a mixed-task batch (adapter_names=...) cannot give each sample its own "
                "weight there. Run one adapter per batch with set_adapter() for this model."
            )
        terms = self._terms(self.active_adapters)
        return form_weight(base.weight, self._weight_terms(terms)) if terms else base.weight

    def _terms(self, adapters: list[str]) -> list[tuple[str, torch.Tensor, Any]]:
        """(adapter, score, gate) for each delta of ``adapters`` that this forward adds: all of them, through the
        device gate, while the gates learn; only the open ones (gate ``True``) when ``TAPSModel`` read the gates on
        the host for this forward."""
        adapters = [a for a in adapters if self.has_delta(a)]
        scores = [self.taps_scores[a] for a in adapters]
        learning = torch.is_grad_enabled() and any(s.requires_grad for s in scores)
        # Host gates (read once by TAPSModel for this forward) let closed layers run as the base layer, so a closed
        # delta gets no gradient (None: weight decay leaves it alone). Not while the gates learn. Frozen gates with
        # trainable deltas and none handed over (the recompute of activation checkpointing, in the backward, after
        # this forward's gates are gone): the layer reads its own, the same values, so forward and recompute take
        # the same path.
        host = None if learning else self._gates
        if host is None and not learning and torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
                p.requires_grad for a in adapters for p in self.adapter_params(a)):
            host = {a: self.is_active(a) for a in adapters}
        terms = []
        for a, s in zip(adapters, scores):
            gate = None if host is None else host.get(a)
            if gate is None:
                terms.append((a, s, self.gate(a)))
            elif gate:
                terms.append((a, s, True))
        return terms

    def _weight_terms(self, terms: list[tuple[str, torch.Tensor, Any]]) -> list:
        """``form_weight``'s (delta, score, gate) terms: a low-rank delta is formed here, in autograd, so the
        straight-through gate gives it grad(D) = gate * grad(W) and the score <grad(W), D>."""
        return [(self.delta(a), s, gate) for a, s, gate in terms]

    def _runs_factored(self, x: torch.Tensor, adapter: str) -> bool:
        """Whether the adapter's low-rank delta runs through the input this call (``lowrank.prefers_factored``, from
        shapes only); a grouped conv, or a layer run as a module (a subclass, forward hooks), always forms its
        weight."""
        base = self.get_base_layer()
        if adapter not in self.taps_rank or type(base) not in (nn.Linear, *_CONV) or getattr(base, "groups", 1) != 1:
            return False  # a grouped conv's factors only exist as a weight
        if base._forward_hooks or base._forward_pre_hooks:
            return False
        # A training step counts its backward. In training mode also without grad: reentrant activation checkpointing
        # runs the forward without grad, then again with it, and both must take the same path.
        weight, grad = base.weight, torch.is_grad_enabled() or self.training
        params = (self.taps_A[adapter], self.taps_B[adapter], self.taps_scores[adapter])
        return lowrank.prefers_factored(
            lowrank.output_rows(base, x), weight.numel() // weight.shape[0], weight.shape[0], self.taps_rank[adapter],
            backward=grad and any(p.requires_grad for p in params), base_trains=grad and weight.requires_grad,
        )

    def _adapter_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One matmul/conv with ``W_base`` plus the gated deltas of ``adapters``; a low-rank delta runs through the
        input instead, ``base(x) + g * scale * B(A(x))``, where that is cheaper."""
        terms = self._terms(adapters)
        if not terms:
            return self.base_layer(x, *args, **kwargs)
        factored = [self._runs_factored(x, a) for a, _, _ in terms]
        formed = [t for t, f in zip(terms, factored) if not f]
        out = self._formed_forward(x, formed, *args, **kwargs) if formed else self.base_layer(x, *args, **kwargs)
        for (a, s, gate), f in zip(terms, factored):
            if f:
                # straight-through: the value 1[s >= tau], d/ds = <dL/dy, scale * B(A(x))>
                st = None if gate is True else gate.to(s.dtype) + (s - s.detach())
                z = lowrank.factored_output(self.get_base_layer(), x, self.taps_A[a], self.taps_B[a],
                                            self.taps_scaling[a], st)
                out = out + z.to(out.dtype)
        return out

    def _formed_forward(self, x: torch.Tensor, terms: list, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One matmul/conv with ``W_base`` plus the gated deltas of ``terms``."""
        base = self.get_base_layer()
        terms = self._weight_terms(terms)
        weight = form_weight(base.weight, terms)
        if (
            not (torch.is_grad_enabled() and weight.requires_grad)
            or torch.compiler.is_compiling()  # the compiler decides what to save and what to recompute
            or type(weight) is not torch.Tensor  # a tensor subclass (DTensor under tensor parallelism, ...)
            or outer_saved_tensors_hooks()  # activation checkpointing: it decides what is saved
        ):
            return self._functional_forward(x, weight, *args, **kwargs)
        with RecomputeFormedWeight(weight, partial(form_weight, base.weight, terms)):
            return self._functional_forward(x, weight, *args, **kwargs)

    def _functional_forward(self, x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's own computation with ``weight``: one matmul/conv. A subclass (timm ``Conv2dSame``,
        ``StdConv2d``, ...) or a layer with forward hooks is called as a module, so its forward and hooks run."""
        base = self.get_base_layer()
        if not (base._forward_hooks or base._forward_pre_hooks):
            if type(base) is nn.Linear:
                return F.linear(x, weight, base.bias)
            if type(base) in _CONV:
                return base._conv_forward(x, weight, base.bias)
        return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


class _TAPSModule(nn.Module, TAPSLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TAPSConfig, **kwargs: Any) -> None:
        super().__init__()
        TAPSLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            check_batch_names(x, adapter_names)
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters: call unmerge_adapter().")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:  # the base layer holds the task's weight
            return self.base_layer(x, *args, **kwargs)
        return self._adapter_forward(x, self.active_adapters, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample runs with its own adapter (``"__base__"``: the base layer): one matmul/conv per adapter."""
        parts = [(rows, self._adapter_forward(x.index_select(0, rows), [name], *args, **kwargs))
                 for name, rows in sample_groups(adapter_names, x.device)]
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for rows, ys in parts:
            out.index_copy_(0, rows, ys)
        return out

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        """``model.half()``, ``.to(dtype)``, ``.cuda()``: every tensor converts (the set-aside base weight too), but
        scores keep their exact fp32 value."""
        scores = {name: p.data for name, p in self.taps_scores.items()}
        super()._apply(fn, recurse)
        for name, p in self.taps_scores.items():
            if p.dtype != torch.float32 and not is_sharded(p):
                p.data = scores[name].to(p.device)
        if self._unmerged_weight is not None:  # the base weight set aside while merged follows the model too
            self._unmerged_weight = fn(self._unmerged_weight)
        return self

    def __repr__(self) -> str:
        return "taps." + super().__repr__()


class Linear(_TAPSModule):
    """TAPS on an ``nn.Linear`` (or subclass): ``F.linear(x, W_base + g * dW, bias)``."""


class Conv(_TAPSModule):
    """TAPS on an ``nn.Conv1d/2d/3d`` (or subclass), grouped and depthwise included: one conv with the gated weight."""


_HALF = (torch.float16, torch.bfloat16)
DELTA_PARAMS = ("taps_delta", "taps_A", "taps_B")  # a layer's delta: full-size, or low-rank factors (TAPSConfig.r)


def delta_shapes(base: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The delta parameters an adapter with ``config`` gives the (base) layer ``base``, with their shapes: a full
    delta, or factors A and B where ``config.r`` is set and the layer fits.

    Example:
        >>> delta_shapes(nn.Linear(32, 16), TAPSConfig(r=4))  # doctest: +SKIP
        {'taps_A': (4, 32), 'taps_B': (16, 4)}
    """
    if lowrank.lowrank_fits(base, getattr(config, "r", None)):
        a, b = lowrank.factor_shapes(base.weight.shape, config.r)
        return {"taps_A": a, "taps_B": b}
    return {"taps_delta": tuple(base.weight.shape)}


def restart_delta(layer: TAPSLayer, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The values a layer's absent (unsaved) delta takes for an adapter that may train: zeros, or for factors B = 0
    and A drawn afresh as LoRA's (reproducibly; A = B = 0 would never learn), so the delta is zero either way. In the
    dtype of what the layer holds for the adapter (its base weight's when nothing)."""
    weight = layer.get_base_layer().weight
    shapes = delta_shapes(layer.get_base_layer(), config)
    held = [getattr(layer, p)[adapter_name] for p in DELTA_PARAMS if adapter_name in getattr(layer, p)]
    dtype = held[0].dtype if held else weight.dtype
    if "taps_delta" in shapes:
        return {"taps_delta": torch.zeros(shapes["taps_delta"], dtype=dtype, device=weight.device)}
    scale = lowrank.layer_scale(weight, config.r, config.alpha)
    a, b = lowrank.init_factors(weight, config.r, scale, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return {"taps_A": a, "taps_B": b}
