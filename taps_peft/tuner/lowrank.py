"""Low-rank gated deltas (``TAPSConfig(r=...)``): ``W = W_base + 1[s >= tau] * scale * B @ A`` under the same score,
gate and penalty as a full delta; ``scale = alpha / r`` (LoRA's ``lora_alpha / r``) with ``alpha``, and by default the
scale at which a low-rank delta trains at a full delta's learning rate (:func:`layer_scale`).

Shapes follow PEFT's LoRA: a Linear gets A (r, in) and B (out, r); a convolution gets A of the layer's kernel into r
channels, (r, in, *kernel), and B a 1x1 conv (out, r, 1, ...). A grouped or depthwise conv factors its weight the same
way, (out, in / groups * kernel) = B @ A, and always runs in weight form (PEFT's LoRA cannot hold it at all). A layer
where the factors would not be smaller than the weight keeps a full delta (:func:`lowrank_fits`).

Example:
    >>> conv = torch.nn.Conv2d(64, 64, 3)
    >>> lowrank_fits(conv, 4), factor_shapes(conv.weight.shape, 4)
    (True, ((4, 64, 3, 3), (64, 4, 1, 1)))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by weight dims


def lowrank_fits(base: nn.Module, r: Optional[int]) -> bool:
    """Whether ``base`` gets rank-``r`` factors: ``r`` is set and the factors hold fewer elements than the weight,
    ``r * (in * k / groups + out) < in * out * k / groups`` (a depthwise conv: ``r * (k + out) < out * k``).

    Example:
        >>> lowrank_fits(torch.nn.Linear(8, 8), 4)  # 4 * (8 + 8) = 64 >= 64: a full delta
        False
        >>> lowrank_fits(torch.nn.Conv2d(1152, 1152, 5, groups=1152), 8)  # 8 * (25 + 1152) < 1152 * 25
        True
    """
    return r is not None and factors_numel(base.weight, r) < base.weight.numel()


STEP_GAIN = 1.0  # measured: docs/results.md (low-rank deltas and the lam warm-up at the defaults)


def layer_scale(weight: torch.Tensor, r: int, alpha: Optional[float] = None) -> float:
    """The scale of a layer's low-rank delta: ``alpha / r`` when ``alpha`` is given (LoRA's), else
    ``STEP_GAIN * sqrt(3 * fan_in / r)``. A's entries (LoRA's kaiming-uniform init) have variance ``1 / (3 fan_in)``,
    so at that scale one Adam step of B (each entry moves by about the learning rate) moves each entry of the weight by
    about ``STEP_GAIN`` times the learning rate, where a full delta's entry moves by one: low-rank deltas train at the
    learning rates full-size deltas train at (with LoRA's scale 1 a rank-8 delta of a 1152-wide layer moves 20x less).

    Example:
        >>> round(layer_scale(torch.empty(64, 1152), 8), 1), layer_scale(torch.empty(64, 1152), 8, alpha=16)
        (20.8, 2.0)
    """
    if alpha is not None:
        return alpha / r
    return STEP_GAIN * math.sqrt(3 * (weight.numel() // weight.shape[0]) / r)


def factors_numel(weight: torch.Tensor, r: int) -> int:
    """Elements of the rank-``r`` factors A and B of ``weight``: ``r * (fan_in + out)``.

    Example:
        >>> factors_numel(torch.empty(16, 32), 4)
        192
    """
    return r * (weight.numel() // weight.shape[0] + weight.shape[0])


def factor_shapes(shape: torch.Size | tuple, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for a weight of ``shape`` (PEFT LoRA's ``lora_A`` / ``lora_B`` weight shapes)."""
    shape = tuple(shape)
    return (r, *shape[1:]), (shape[0], r, *(1,) * (len(shape) - 2))


def init_factors(weight: torch.Tensor, r: int, scale: float, random_b: bool = False,
                 generator: Optional[torch.Generator] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A as LoRA's (kaiming uniform, a=sqrt(5); from ``generator`` if given) and B zeros, so the delta starts at zero;
    ``random_b`` (PEFT's ``init_weights=False`` convention, for tests) draws B so the delta is about 2% of the
    weight's spread. In ``dtype`` (default: the weight's), on the weight's device."""
    shape, dtype = tuple(weight.shape), dtype or weight.dtype
    a_shape, b_shape = factor_shapes(shape, r)
    a = torch.empty(a_shape, dtype=dtype, device=weight.device)
    b = torch.zeros(b_shape, dtype=dtype, device=weight.device)
    if weight.device.type == "meta":
        return a, b
    with torch.no_grad():
        if generator is None:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:  # the same distribution, drawn reproducibly (on the CPU)
            bound = 1.0 / math.sqrt(a[0].numel())
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound))
        if random_b:
            b.copy_(torch.randn(b.shape, dtype=torch.float32, device=weight.device).to(b.dtype))
            delta = lowrank_delta(a.float(), b.float(), scale, shape)
            b.mul_(0.02 * (weight.float().std().item() or 1.0) / (delta.std().item() or 1.0))
    return a, b


def lowrank_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape: torch.Size | tuple) -> torch.Tensor:
    """``scale * B @ A`` in the weight's shape (in the factors' dtype, inside autograd)."""
    r = a.shape[0]
    return (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(shape) * scale


def prefers_factored(rows: int, fan_in: int, out: int, r: int, backward: bool = False,
                     base_trains: bool = False) -> bool:
    """Whether ``base(x) + g * scale * B(A(x))`` costs fewer multiply-adds than one matmul/conv with the formed
    weight ``W_base + g * scale * B @ A``. ``rows``: output positions of this call (batch x spatial, or tokens);
    ``fan_in``: in * kernel elements (per group).

    Beyond what the base layer costs anyway:
      - weight form: forming D = scale * B @ A, ``out * r * fan_in``. With a backward also grad(D) -> grad(A),
        grad(B) (``2 * out * r * fan_in``) and, unless the base weight trains anyway (joint training), the weight
        gradient of the main matmul/conv (``rows * out * fan_in``), which the factored path never computes.
      - factored: A then B at every output position, ``rows * r * (fan_in + out)``; a backward adds twice that.
    r cancels in a forward without gradients: factored while ``rows * (fan_in + out) < out * fan_in`` (few tokens
    or pixels per call); in training the skipped weight gradient favours the factored path on most layers.

    Example:
        >>> prefers_factored(rows=8, fan_in=192, out=576, r=4)  # 8 tokens: B(A(x)) is cheaper than forming D
        True
        >>> prefers_factored(rows=32 * 56 * 56, fan_in=576, out=64, r=4)  # a big feature map: form D once
        False
    """
    weight = out * r * fan_in
    factored = rows * r * (fan_in + out)
    if backward:
        weight += 2 * out * r * fan_in + (0 if base_trains else rows * out * fan_in)
        factored *= 3
    return factored < weight


def output_rows(base: nn.Module, x: torch.Tensor) -> int:
    """The output positions of ``base`` on ``x`` (from shapes only: no host read): tokens for a Linear, batch x
    output pixels for a conv."""
    if not isinstance(base, nn.modules.conv._ConvNd):
        return x.numel() // max(x.shape[-1], 1)
    dims = len(base.kernel_size)
    batch = x.shape[0] if x.dim() == dims + 2 else 1
    rows = batch
    for i, size in enumerate(x.shape[-dims:]):
        if base.padding == "same":
            rows *= size
            continue
        pad = 0 if base.padding == "valid" else base.padding[i]
        rows *= max((size + 2 * pad - base.dilation[i] * (base.kernel_size[i] - 1) - 1) // base.stride[i] + 1, 0)
    return rows


def factored_output(base: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                    gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale * gate * B(A(x))`` in the factors' dtype: A with the layer's own stride, padding and dilation, B
    pointwise. The gate (a one-element straight-through tensor, or None when open) multiplies the r-channel middle,
    so a training step keeps ``rows * r`` numbers for the score's gradient, not a full output (LoRA's memory)."""
    mid = F.linear(x.to(a.dtype), a) if isinstance(base, nn.Linear) else base._conv_forward(x.to(a.dtype), a, None)
    mid = mid * (scale if gate is None else gate.to(mid.dtype) * scale)
    return F.linear(mid, b) if isinstance(base, nn.Linear) else _CONV_FN[b.dim()](mid, b)
