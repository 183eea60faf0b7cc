"""The gated weight ``W_base + 1[s >= tau] * dW``: its autograd function (the paper's straight-through gate) and the
saved-tensor hooks that keep the formed weight out of autograd's memory."""

from __future__ import annotations

from typing import Any, Callable

import torch

Term = tuple[torch.Tensor, torch.Tensor, Any]  # (delta, score, gate): gate a device tensor, or True (known open)


class _GatedWeight(torch.autograd.Function):
    """``W_base + gate * dW`` with the paper's straight-through gate (``gate = 1[s >= tau]``, a 0/1 device tensor).

    Backward: grad(dW) = gate * grad(W) (a zero tensor when closed, so DDP never sees unused parameters) and
    grad(s) = <grad(W), dW> (no extra matmul); a trainable base weight (joint training) gets grad(W).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, delta: torch.Tensor, score: torch.Tensor, gate: torch.Tensor):
        gate = gate.to(base.dtype)
        ctx.score_dtype = score.dtype
        ctx.save_for_backward(delta, gate)
        return torch.addcmul(base, gate, delta.to(base.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        delta, gate = ctx.saved_tensors
        grad_delta = (grad * gate).to(delta.dtype) if ctx.needs_input_grad[1] else None
        grad_score = None
        if ctx.needs_input_grad[2]:
            grad_score = torch.dot(grad.reshape(-1), delta.reshape(-1).to(grad.dtype)).reshape(1).to(ctx.score_dtype)
        return (grad if ctx.needs_input_grad[0] else None), grad_delta, grad_score, None


def form_weight(base: torch.Tensor, terms: list[Term]) -> torch.Tensor:
    """``W_base`` plus each term: through the straight-through gate, or plainly added when known to be open."""
    for delta, score, gate in terms:
        base = base + delta.to(base.dtype) if gate is True else _GatedWeight.apply(base, delta, score, gate)
    return base


def outer_saved_tensors_hooks() -> bool:
    """Whether saved-tensor hooks are already in force (activation checkpointing, offloading) or disabled."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class RecomputeFormedWeight(torch.autograd.graph.saved_tensors_hooks):
    """Keep the formed weight out of what autograd saves: a matmul/conv saves its weight for grad(x); these hooks
    save a recipe instead and re-form the weight in the backward (the same ops, bit for bit), so training memory holds
    base + delta, as a full fine-tune holds weight + grad. Scoped to one call: nothing outlives it."""

    def __init__(self, weight: torch.Tensor, form: Callable[[], torch.Tensor]) -> None:
        ptr = weight.untyped_storage().data_ptr()

        def pack(t: torch.Tensor) -> Any:
            if type(t) is not torch.Tensor or t.untyped_storage().data_ptr() != ptr:  # anything else: saved as is
                return t
            return t.size(), t.stride(), t.storage_offset()

        def unpack(saved: Any) -> torch.Tensor:  # autograd re-attaches the original weight's graph edge
            if isinstance(saved, torch.Tensor):
                return saved
            with torch.no_grad():
                return form().as_strided(*saved)

        super().__init__(pack, unpack)
