"""TAPS layers: a frozen base layer plus, per adapter, a gated full-size delta and a score."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .config import TAPSConfig

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _GatedWeight(torch.autograd.Function):
    """``weight + 1[score >= tau] * delta`` in one fused op, with the straight-through gate of the paper.

    Backward: grad(delta) = gate * grad(W), grad(score) = <grad(W), delta>; no extra matmul. An inactive delta gets a
    zero gradient (not None), so DDP never sees unused parameters.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, delta: torch.Tensor, score: torch.Tensor, tau: float) -> torch.Tensor:
        on = score >= tau
        # On CPU the gate is read for free, so an open gate skips the multiply (no GPU sync is ever forced).
        ctx.open = weight.device.type == "cpu" and bool(on)
        gate = on.to(weight.dtype)
        ctx.save_for_backward(delta, gate)
        ctx.score_dtype = score.dtype
        return weight + delta if ctx.open else torch.addcmul(weight, gate, delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        delta, gate = ctx.saved_tensors
        grad_weight = grad if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_delta = grad if ctx.open else grad * gate
        grad_score = None
        if ctx.needs_input_grad[2]:
            grad_score = torch.dot(grad.reshape(-1), delta.reshape(-1)).reshape(1).to(ctx.score_dtype)
        return grad_weight, grad_delta, grad_score, None


class TAPSLayer(BaseTunerLayer):
    """State and merge logic shared by every TAPS layer; see [`Linear`] and [`Conv`] for the modules."""

    adapter_layer_names = ("taps_delta", "taps_score")
    other_param_names = ("taps_tau",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.taps_delta = nn.ParameterDict({})
        self.taps_score = nn.ParameterDict({})
        self.taps_tau: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._cached_weight: Optional[tuple[tuple, Optional[torch.Tensor]]] = None
        base = self.get_base_layer()
        if isinstance(base, _CONV):
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: TAPSConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: a zero delta (or random if ``init_weights=False``) and a score."""
        weight = self.get_base_layer().weight
        if weight.device.type == "meta" or config.init_weights:
            delta = torch.zeros_like(weight)
        else:
            delta = torch.randn_like(weight) * 0.02 * (weight.float().std().item() or 1.0)
        self.taps_delta[adapter_name] = nn.Parameter(delta)
        self.taps_score[adapter_name] = nn.Parameter(torch.full((1,), float(config.score_init), device=weight.device))
        self.taps_tau[adapter_name] = float(config.tau)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        score = self.taps_score.get(adapter_name)
        if score is not None and score.dtype != torch.float32:  # scores stay fp32: 0.15 vs 0.1 must be exact
            self.taps_score[adapter_name] = nn.Parameter(score.float(), requires_grad=score.requires_grad)

    def is_active(self, adapter_name: str) -> bool:
        """Whether the layer is task-specific for ``adapter_name`` (score >= tau)."""
        return bool(self.taps_score[adapter_name].detach().item() >= self.taps_tau[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The gated delta ``1[s >= tau] * dW`` in the base weight's dtype."""
        weight = self.get_base_layer().weight
        gate = (self.taps_score[adapter_name].detach() >= self.taps_tau[adapter_name]).to(weight.dtype)
        return gate * self.taps_delta[adapter_name].detach().to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's gated delta to the base weight in place."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.taps_delta:
                continue
            merged = weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)
        self._cached_weight = None

    def unmerge(self) -> None:
        """Subtract the merged deltas again (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.taps_delta:
                weight.data.sub_(self.get_delta_weight(name))
        self._cached_weight = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _adapters_in_use(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.taps_delta]

    def _effective_weight(self, adapters: list[str]) -> torch.Tensor:
        """Training path: always form the gated weight (every gate stays in the graph)."""
        weight = self.get_base_layer().weight
        for name in adapters:
            delta = self.taps_delta[name].to(weight.dtype)
            weight = _GatedWeight.apply(weight, delta, self.taps_score[name], self.taps_tau[name])
        return weight

    def _inference_weight(self, adapters: list[str]) -> Optional[torch.Tensor]:
        """No-grad path: the formed weight, cached until a parameter changes; None when no gate is on.

        The cache is keyed on the tensors' storage and version counters (bumped by in-place updates such as
        optimizer steps and ``load_state_dict``) and dropped on ``train()``/``eval()`` and merge/unmerge. Edits made
        through ``param.data`` bypass version counters: switch modes after such edits.
        """
        weight = self.get_base_layer().weight
        tensors = [weight] + [t for a in adapters for t in (self.taps_delta[a], self.taps_score[a])]
        key = (tuple(adapters), tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))
        if self._cached_weight is None or self._cached_weight[0] != key:
            on = [a for a in adapters if self.is_active(a)]
            formed = weight + sum(self.taps_delta[a].to(weight.dtype) for a in on) if on else None
            self._cached_weight = (key, formed)
        return self._cached_weight[1]

    def _functional_forward(self, x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the base layer's own computation with ``weight``: one matmul/conv."""
        base = self.get_base_layer()
        if type(base) is nn.Linear:
            return F.linear(x, weight, base.bias)
        if type(base) in _CONV:
            return base._conv_forward(x, weight, base.bias)
        # Subclasses (timm Conv2dSame, StdConv2d, ...) keep their own forward.
        return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


class _TAPSModule(nn.Module, TAPSLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TAPSConfig, **kwargs: Any) -> None:
        super().__init__()
        TAPSLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = self._adapters_in_use()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled():
            self._cached_weight = None
            weight = self._effective_weight(adapters)
        else:
            weight = self._inference_weight(adapters)
            if weight is None:  # every gate off: exactly the base layer, at no extra cost
                return self.base_layer(x, *args, **kwargs)
        return self._functional_forward(x, weight, *args, **kwargs)

    def train(self, mode: bool = True) -> "_TAPSModule":
        self._cached_weight = None
        return super().train(mode)

    def __repr__(self) -> str:
        return "taps." + super().__repr__()


class Linear(_TAPSModule):
    """TAPS on an ``nn.Linear`` (or subclass): ``F.linear(x, W_base + g * dW, bias)``."""


class Conv(_TAPSModule):
    """TAPS on an ``nn.Conv1d/2d/3d`` (or subclass), grouped and depthwise included: one conv with the gated weight."""
