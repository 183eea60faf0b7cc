"""A faster CPU weight gradient for depthwise convolutions, where oneDNN's is slow: :func:`faster_depthwise_convs`.

When a depthwise kernel is larger than its channels-last input map (EfficientNet's 5x5 kernels on the 4x4 and 2x2
maps of a 64 px image), torch's CPU backward (oneDNN, torch 2.14) takes 10-70x longer for the weight gradient than
for the input gradient: about half of a fine-tuning step of EfficientNet-Lite0 at 64 px. There this module computes
the weight gradient as one multiply-and-sum per kernel tap (``k * k`` small reductions, 5-35x faster); everything
else (the forward, the input gradient, other layers, channels-first inputs, where the taps are slower than oneDNN,
and other devices) stays torch's own. The values agree to float rounding. ``python benchmarks/bench_train_step.py
--model tf_efficientnet_lite0 --img-size 64 --batch 32 --faster-depthwise`` times the step.

Example:
    >>> model = timm.create_model("tf_efficientnet_lite0").to(memory_format=torch.channels_last)  # doctest: +SKIP
    >>> faster_depthwise_convs(model)  # doctest: +SKIP
    12
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[int, int]


class _DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with the windowed weight gradient (the
    backward is made of differentiable ops: double backward and ``torch.func`` transforms work)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Pair, padding: Pair,
                dilation: Pair, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, _, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad, weight.shape[-2:], stride, padding, dilation)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride: Pair, padding: Pair,
                          dilation: Pair) -> torch.Tensor:
    """d loss / d weight of a depthwise conv (one filter per channel): for each kernel tap, the sum over batch and map
    of the output gradient times the input window that tap sees.

    Example:
        >>> x, w = torch.randn(2, 4, 2, 2), torch.randn(4, 1, 3, 3)
        >>> g = torch.ones_like(F.conv2d(x, w, None, 1, 1, 1, 4))
        >>> depthwise_weight_grad(x, g, (3, 3), (1, 1), (1, 1), (1, 1)).shape
        torch.Size([4, 1, 3, 3])
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    ho, wo = grad.shape[-2:]
    taps = [(xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw] * grad).sum((0, 2, 3))
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, -1).view(-1, 1, kh, kw)


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _conv_forward(conv: dict, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``nn.Conv2d._conv_forward`` of a depthwise conv: the windowed weight gradient where oneDNN's is slow (on the CPU
    in float32 with grad, a channels-last input map smaller than the kernel), torch's own conv everywhere else."""
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    kh, kw = weight.shape[-2:]
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
            and weight.requires_grad and x.dim() == 4 and (kh > x.shape[-2] or kw > x.shape[-1])
            and x.is_contiguous(memory_format=torch.channels_last) and weight.shape[0] == conv["groups"]
            and not _autocast_on_cpu() and not torch.compiler.is_compiling()):
        return _DepthwiseConv2d.apply(x, weight, bias, *args)
    return F.conv2d(x, weight, bias, *args)


def faster_depthwise_convs(model: nn.Module) -> int:
    """Give each depthwise ``nn.Conv2d`` of ``model`` (one filter per channel, zero padding; timm's ``Conv2dSame``, a
    subclass, is left alone) the windowed weight gradient on the CPU; returns how many. Parameters, state dict and
    module types are unchanged, copies of the model (``copy.deepcopy``) keep it, and TAPS, PEFT and ``torch.compile``
    wrap the convs as before. Stride, padding and dilation are read once, here. ``torch.jit.script`` cannot compile
    the changed convs.

    Example (timm 1.0's Lite0: 12 depthwise convs, its 4 stride-2 ones are ``Conv2dSame``):
        >>> faster_depthwise_convs(timm.create_model("tf_efficientnet_lite0"))  # doctest: +SKIP
        12
    """
    count = 0
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups > 1 and module.groups == module.in_channels
                == module.out_channels and module.padding_mode == "zeros" and isinstance(module.padding, tuple)):
            conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                    "groups": module.groups}
            module._conv_forward = partial(_conv_forward, conv)  # what nn.Conv2d.forward (and TAPS) calls
            count += 1
    return count
