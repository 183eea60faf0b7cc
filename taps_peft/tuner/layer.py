"""TAPS layers: a frozen base layer plus, per adapter, a gated full-size delta and a score."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .config import TAPSConfig

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_optimizer_steps = 0  # every torch optimizer step, counted: fused optimizers update in place without bumping versions


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor: an FSDP2 parameter outside its module's forward."""
    return hasattr(t, "full_tensor")


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded parameter gathered (a collective: every rank must call it), anything else as is."""
    return t.full_tensor() if _is_sharded(t) else t


def tensor_key(t: torch.Tensor) -> tuple[int, int, int]:
    """Changes whenever ``t`` may have changed: its storage, its version counter, or any optimizer step since."""
    return (t.data_ptr(), t._version, _optimizer_steps)


class _GatedWeight(torch.autograd.Function):
    """``W_base + 1[s >= tau] * dW`` with the paper's straight-through gate.

    ``gate`` is the gate read on the host (a bool: an open gate adds, a closed one returns the base) or, under
    ``torch.compile``, a 0-d tensor (one fused multiply-add, no graph break). Backward: grad(dW) = gate * grad(W) (a
    zero tensor, not None, when closed, so DDP never sees unused parameters) and grad(s) = <grad(W), dW>; no extra
    matmul. A trainable base weight (joint training) gets grad(W).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, delta: torch.Tensor, score: torch.Tensor, gate) -> torch.Tensor:
        ctx.score_dtype = score.dtype
        if isinstance(gate, torch.Tensor):
            gate = gate.to(base.dtype)
            ctx.save_for_backward(delta, gate)
            return torch.addcmul(base, gate, delta.to(base.dtype))
        ctx.is_open = gate
        ctx.save_for_backward(delta)
        return base + delta.to(base.dtype) if gate else base.view_as(base)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        delta, *gate = ctx.saved_tensors
        grad_delta = grad_score = None
        if ctx.needs_input_grad[1]:
            if gate:
                grad_delta = (grad * gate[0]).to(delta.dtype)
            else:
                grad_delta = grad.to(delta.dtype) if ctx.is_open else torch.zeros_like(delta)
        if ctx.needs_input_grad[2]:
            dot = torch.dot(grad.reshape(-1), delta.reshape(-1).to(grad.dtype))
            grad_score = dot.reshape(1).to(ctx.score_dtype)
        grad_base = grad if ctx.needs_input_grad[0] else None  # a trainable base (joint training, Eq. 4)
        return grad_base, grad_delta, grad_score, None


def _form_weight(base: torch.Tensor, gates: list[tuple[torch.Tensor, torch.Tensor, Any]]) -> torch.Tensor:
    """``W_base`` plus each (delta, score, gate) through the straight-through gate."""
    for delta, score, gate in gates:
        base = _GatedWeight.apply(base, delta, score, gate)
    return base


def _outer_saved_tensors_hooks() -> bool:
    """Whether saved-tensor hooks are already in force (activation checkpointing, offloading) or disabled."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _RecomputeFormedWeight(torch.autograd.graph.saved_tensors_hooks):
    """Keep the formed weight ``W_base + dW`` out of the tensors autograd saves for backward: a matmul/conv saves its
    weight (or a view of it) for grad(x); these hooks save a recipe instead and re-form the weight (one add, bit for
    bit) in the backward. Training memory then holds base + delta, like a full fine-tune holds weight + grad."""

    def __init__(self, weight: torch.Tensor, form: Callable[[], torch.Tensor]) -> None:
        ptr = weight.untyped_storage().data_ptr()

        def pack(t: torch.Tensor) -> Any:
            if type(t) is not torch.Tensor or t.untyped_storage().data_ptr() != ptr:  # subclasses: saved as they are
                return t
            return t.size(), t.stride(), t.storage_offset()

        def unpack(saved: Any) -> torch.Tensor:  # autograd re-attaches the original weight's graph edge
            if isinstance(saved, torch.Tensor):
                return saved
            with torch.no_grad():
                return form().as_strided(*saved)

        super().__init__(pack, unpack)


def sample_groups(adapter_names: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapter named in a mixed-task batch, with the batch rows of its samples (in order of first use)."""
    for name in dict.fromkeys(adapter_names):
        yield name, torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=device)


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
        self._unmerged_weight: Optional[torch.Tensor] = None  # the base weight's own data while merged
        self._gates: dict[str, tuple[tuple[int, int, int], bool]] = {}  # host copy of each gate, keyed on the score
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
        trainable = adapter_name in self.active_adapters and not config.inference_mode  # a new adapter starts frozen
        score = torch.full((1,), float(config.score_init), device=weight.device)
        self.taps_delta[adapter_name] = nn.Parameter(delta, requires_grad=trainable)
        self.taps_score[adapter_name] = nn.Parameter(score, requires_grad=trainable)
        self.taps_tau[adapter_name] = float(config.tau)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names`` (trainable unless ``inference_mode``), as PEFT's ``set_adapter``, touching only
        the adapters active before and after: the others are already frozen, so a switch costs the same with 2 or 50
        adapters loaded (the rule PEFT's ``ModulesToSaveWrapper`` follows too)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in dict.fromkeys([*self.active_adapters, *names]):
            for params in (self.taps_delta, self.taps_score):
                if name in params:
                    params[name].requires_grad_(name in names and not inference_mode)
        self._active_adapter = names

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        score = self.taps_score.get(adapter_name)
        if score is not None and score.dtype != torch.float32:  # scores stay fp32: 0.15 vs 0.1 must be exact
            self.taps_score[adapter_name] = nn.Parameter(score.float(), requires_grad=score.requires_grad)

    @torch.compiler.disable  # a host-side read: torch.compile breaks the graph here instead of recompiling
    def is_active(self, adapter_name: str) -> bool:
        """Whether the layer is task-specific for ``adapter_name`` (score >= tau); read once per score update."""
        score = self.taps_score[adapter_name]
        cached = self._gates.get(adapter_name)
        if cached is None or cached[0] != tensor_key(score):
            self._set_gate(adapter_name, _full_tensor(score).detach().item())
        return self._gates[adapter_name][1]

    def _set_gate(self, adapter_name: str, value: float) -> None:
        """Record a score read elsewhere (``TAPSModel`` reads every score in one transfer per step)."""
        score = self.taps_score[adapter_name]
        self._gates[adapter_name] = (tensor_key(score), value >= self.taps_tau[adapter_name])

    def release_inactive_delta(self, adapter_name: str) -> bool:
        """Free the memory of a frozen, inactive, all-zero delta (a loaded layer absent from the adapter file): it
        becomes a stride-0 view of one zero. Returns whether it did. Used for adapters loaded for inference."""
        delta = self.taps_delta[adapter_name]
        if delta.requires_grad or self.is_active(adapter_name) or 0 in delta.stride() or delta.any():
            return False
        zero = torch.zeros((), dtype=delta.dtype, device=delta.device).expand(delta.shape)
        self.taps_delta[adapter_name] = nn.Parameter(zero, requires_grad=False)
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The gated delta ``1[s >= tau] * dW`` in the base weight's dtype, detached."""
        delta = self.taps_delta[adapter_name].detach().to(self.get_base_layer().weight.dtype)
        return delta if self.is_active(adapter_name) else torch.zeros_like(delta)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the open adapters' deltas to the base weight; its own data is set aside so unmerge is exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.taps_delta:
                continue
            if self.is_active(name):
                merged = weight.data + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                if self._unmerged_weight is None:
                    self._unmerged_weight = weight.data
                weight.data = merged
            self.merged_adapters.append(name)
        self._cached_weight = None

    def unmerge(self) -> None:
        """Undo every merge: the base weight gets its own data back, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._unmerged_weight is not None:
            self.get_base_layer().weight.data = self._unmerged_weight
            self._unmerged_weight = None
        self.merged_adapters.clear()
        self._cached_weight = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _adapters_in_use(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.taps_delta]

    def _trains(self, adapters: list[str]) -> bool:
        return torch.is_grad_enabled() and any(
            self.taps_delta[a].requires_grad or self.taps_score[a].requires_grad for a in adapters
        )

    def _training_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One matmul/conv with the gated weight; autograd saves a recipe for the formed weight, not the weight."""
        self._cached_weight = None
        base = self.get_base_layer().weight
        compiling = torch.compiler.is_compiling()
        gates = [
            (self.taps_delta[a], self.taps_score[a], self.taps_score[a] >= self.taps_tau[a] if compiling
             else self.is_active(a))
            for a in adapters
        ]
        weight = _form_weight(base, gates)
        if (
            compiling  # the compiler decides what to save and what to recompute
            or type(weight) is not torch.Tensor  # a tensor subclass (DTensor under tensor parallelism, ...)
            or weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # every gate closed
            or _outer_saved_tensors_hooks()
        ):
            return self._functional_forward(x, weight, *args, **kwargs)
        with _RecomputeFormedWeight(weight, partial(_form_weight, base, gates)):
            return self._functional_forward(x, weight, *args, **kwargs)

    def _inference_weight(self, adapters: list[str]) -> Optional[torch.Tensor]:
        """No-grad path: the formed weight, cached until a parameter changes; None when no gate is on.

        The cache is keyed on the tensors' storage, their version counters (bumped by in-place updates such as
        ``load_state_dict``) and a count of optimizer steps (fused optimizers bump no version), and dropped on
        ``train()``/``eval()`` and merge/unmerge. Edits made through
        ``param.data`` bypass version counters: switch modes after such edits. Only in eval mode: a no-grad forward in
        training mode (reentrant activation checkpointing, a quick check) keeps nothing.
        """
        weight = self.get_base_layer().weight
        key = None
        if not self.training:
            tensors = [weight] + [t for a in adapters for t in (self.taps_delta[a], self.taps_score[a])]
            key = (tuple(adapters), tuple((*tensor_key(t), t.dtype) for t in tensors))
            if self._cached_weight is not None and self._cached_weight[0] == key:
                return self._cached_weight[1]
        deltas = [self.taps_delta[a].detach().to(weight.dtype) for a in adapters if self.is_active(a)]
        formed = weight.detach() + sum(deltas) if deltas else None
        self._cached_weight = None if key is None else (key, formed)
        return formed

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

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if self.merged_adapters and not self._disable_adapters and adapter_names is None:
            return self.base_layer(x, *args, **kwargs)  # merged: the base layer holds the task's weight
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        adapters = self._adapters_in_use()
        if adapters and self._trains(adapters):
            return self._training_forward(x, adapters, *args, **kwargs)
        weight = self._inference_weight(adapters) if adapters else None
        if weight is None:
            return self.base_layer(x, *args, **kwargs)
        return self._functional_forward(x, weight, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample runs with its own adapter (``"__base__"``: the base layer): one matmul/conv per adapter."""
        out: Optional[torch.Tensor] = None
        for name, rows in sample_groups(adapter_names, x.device):
            weight = None  # formed per call: a cache per adapter would hold a full weight per task
            if name in self.taps_delta and self.is_active(name):
                weight = self.get_base_layer().weight + self.get_delta_weight(name)
            xs = x.index_select(0, rows)
            if weight is None:
                ys = self.base_layer(xs, *args, **kwargs)
            else:
                ys = self._functional_forward(xs, weight, *args, **kwargs)
            if out is None:
                out = ys.new_empty((x.shape[0], *ys.shape[1:]))
            out.index_copy_(0, rows, ys)
        return out

    def train(self, mode: bool = True) -> "_TAPSModule":
        self._cached_weight = None
        return super().train(mode)

    def __repr__(self) -> str:
        return "taps." + super().__repr__()


class Linear(_TAPSModule):
    """TAPS on an ``nn.Linear`` (or subclass): ``F.linear(x, W_base + g * dW, bias)``."""


class Conv(_TAPSModule):
    """TAPS on an ``nn.Conv1d/2d/3d`` (or subclass), grouped and depthwise included: one conv with the gated weight."""
