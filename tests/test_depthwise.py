"""``faster_depthwise_convs``: the windowed weight gradient equals torch's own, and runs only where it is meant to."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import taps_peft
from taps_peft.training import depthwise, faster_depthwise_convs


def _grads(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    x = x.clone().requires_grad_(True)
    out = conv(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return x.grad, conv.weight.grad, type(out.grad_fn).__name__


@pytest.mark.parametrize("kernel,stride,padding,dilation,size,bias", [
    (5, 1, 2, 1, 4, False),  # EfficientNet's 5x5 on a 4x4 map
    (5, 2, 2, 1, 4, False),
    (3, 1, 1, 1, 2, True),
    (3, 1, 2, 2, 2, False),  # dilated
    ((5, 3), (2, 1), (2, 1), 1, 3, True),  # non-square, one side larger than the map
])
def test_the_windowed_weight_gradient_equals_torch_s_own(kernel, stride, padding, dilation, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, kernel, stride, padding, dilation, groups=12, bias=bias)
    fast = copy.deepcopy(conv)
    assert faster_depthwise_convs(fast) == 1
    x = torch.randn(3, 12, size, size + 1).to(memory_format=torch.channels_last)
    gx, gw, node = _grads(conv, x)
    fx, fw, fast_node = _grads(fast, x)
    assert fast_node == "_DepthwiseConv2dBackward" and node != fast_node  # the windowed path really ran
    torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(fast.bias.grad, conv.bias.grad)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), conv(x))


def test_torch_s_own_conv_runs_wherever_onednn_is_fast_or_nothing_is_trained():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert faster_depthwise_convs(conv) == 1
    channels_last = torch.channels_last
    assert _grads(conv, torch.randn(2, 8, 6, 6).to(memory_format=channels_last))[2] != "_DepthwiseConv2dBackward"
    assert _grads(conv, torch.randn(2, 8, 2, 2))[2] != "_DepthwiseConv2dBackward"  # channels first: oneDNN is faster
    small = torch.randn(2, 8, 2, 2).to(memory_format=channels_last)
    conv.weight.requires_grad_(False)  # a frozen base (LoRA's): only the input gradient, torch's own
    assert type(conv(small.requires_grad_(True)).grad_fn).__name__ != "_DepthwiseConv2dBackward"
    conv.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(conv(small).grad_fn).__name__ != "_DepthwiseConv2dBackward"
    assert conv(small).grad_fn is not None and type(conv(small).grad_fn).__name__ == "_DepthwiseConv2dBackward"


def test_only_depthwise_convs_change_and_the_model_keeps_its_types_state_and_copies():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    keys = list(model.state_dict())
    depthwise = [m for m in model.modules() if type(m) is nn.Conv2d and m.groups == m.in_channels > 1]
    assert faster_depthwise_convs(model) == len(depthwise) > 0
    assert list(model.state_dict()) == keys and all(type(m) is nn.Conv2d for m in depthwise)
    assert all("_conv_forward" in m.__dict__ for m in copy.deepcopy(model).modules() if type(m) is nn.Conv2d
               and m.groups > 1)
    assert all("_conv_forward" not in m.__dict__ for m in model.modules() if type(m) is nn.Conv2d and m.groups == 1)


def test_taps_trains_through_the_windowed_gradient_as_through_torch_s_own(monkeypatch):
    """TAPS's formed weight W + g * dW goes through the patched conv: one step gives the same gradients."""
    timm = pytest.importorskip("timm")
    calls = []
    original = depthwise.depthwise_weight_grad
    monkeypatch.setattr(depthwise, "depthwise_weight_grad", lambda *a: calls.append(a) or original(*a))
    torch.manual_seed(0)
    base = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    fast_base = copy.deepcopy(base)
    faster_depthwise_convs(fast_base)
    base, fast_base = (m.to(memory_format=torch.channels_last) for m in (base, fast_base))  # as the main job
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])  # 32 px: 5x5 kernels on 2x2 maps
    grads = []
    for b in (base, fast_base):
        model = get_peft_model(b, taps_peft.TAPSConfig(lam=0.5))
        model.train()
        loss = F.cross_entropy(model(x), y) + model.taps_penalty()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls  # the windowed path ran (in the second model only: the first one's convs are torch's)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-5 * g.abs().max().item(), msg=name)  # rounding


def test_the_step_benchmark_times_both_gradients_side_by_side(tmp_path, monkeypatch):
    """``bench_train_step.py --faster-depthwise`` adds full FT and TAPS with the windowed gradient to the same rounds."""
    pytest.importorskip("timm")
    import importlib.util
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "bench_train_step.py")
    spec = importlib.util.spec_from_file_location("bench_train_step_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "tf_efficientnet_lite0", "--img-size", "32", "--batch", "4", "--steps", "1",
                       "--warmup", "0", "--no-frozen", "--faster-depthwise", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["strategy"] for r in res["results"]] == ["full FT", "TAPS", "full FT, windowed", "TAPS, windowed"]
    speedup = res["windowed_speedup"]
    assert set(speedup) == {"full FT", "TAPS"} and all(v > 0 for v in speedup.values())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
    nn.Conv2d(4, 4, 3, padding="same", groups=4),
    nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped, not depthwise
    nn.Conv2d(4, 8, 3, padding=1, groups=4),  # two filters per channel
    nn.Conv2d(4, 4, 3, padding=1),
])
def test_convs_that_are_not_plain_depthwise_ones_are_left_alone(conv):
    assert faster_depthwise_convs(conv) == 0 and "_conv_forward" not in conv.__dict__


def test_timm_s_conv2d_same_is_left_alone():
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame

    assert faster_depthwise_convs(Conv2dSame(4, 4, 5, stride=2, groups=4)) == 0


def test_a_pickled_copy_double_backward_and_torch_func_go_through_the_windowed_gradient():
    import pickle

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    fast = pickle.loads(pickle.dumps(copy.deepcopy(conv)))
    assert faster_depthwise_convs(fast) == 1
    fast = pickle.loads(pickle.dumps(fast))  # the change survives pickling (a spawned worker, torch.save)
    x = torch.randn(2, 6, 3, 3).to(memory_format=torch.channels_last).requires_grad_(True)
    assert _grads(fast, x.detach())[2] == "_DepthwiseConv2dBackward"
    for model in (conv, fast):  # a gradient penalty: grad of a grad
        model.zero_grad()
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-6)

    def loss(weight: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return torch.func.functional_call(model, {"weight": weight}, (x.detach(),)).square().sum()

    torch.testing.assert_close(torch.func.grad(loss)(fast.weight.detach(), fast),
                               torch.func.grad(loss)(conv.weight.detach(), conv), rtol=1e-5, atol=1e-6)
