"""PEFT's contract for a tuner, checked on several model families x {fp32, bf16} (in the spirit of PEFT's own
custom-model tests): save/load bit-exact, merge/unmerge, unload, disable, delete and reload, mixed batches,
torch.compile, activation checkpointing."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from taps_peft import TAPSConfig
from conftest import logits, optimizer_for, tiny_hf_vit, tiny_resnet, tiny_timm_vit

FAMILIES = {"timm_vit": tiny_timm_vit, "timm_resnet": tiny_resnet, "hf_vit": tiny_hf_vit}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [(f, d) for f in FAMILIES for d in DTYPES]


def _model(family, dtype, adapters=("a",)):
    """A base in ``dtype`` and a TAPS model on a copy of it with random deltas, half of each adapter's gates open."""
    torch.manual_seed(0)
    base = FAMILIES[family]().to(DTYPES[dtype]).eval()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, TAPSConfig(init_weights=False))
    with torch.no_grad():
        for i, (_, layer) in enumerate(model.base_model.taps_layers()):
            for j, name in enumerate(adapters):
                layer.taps_scores[name].fill_(0.5 if (i + j) % 2 else 0.0)
    return base, model.eval()


def _images(dtype):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])


def _out(model, x):
    with torch.no_grad():
        return logits(model, x)


@pytest.mark.parametrize("family, dtype", CASES)
def test_save_load_is_bit_exact_and_delete_then_reload(tmp_path, family, dtype):
    base, model = _model(family, dtype)
    x = _images(dtype)
    expected = _out(model, x)
    model.save_pretrained(tmp_path)  # a non-default adapter goes to its own subfolder, as in PEFT
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    assert torch.equal(_out(loaded, x), expected)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()
                                                                    if k in loaded.state_dict()}
    loaded.delete_adapter("a")
    loaded.load_adapter(tmp_path / "a", adapter_name="a")
    loaded.set_adapter("a")
    assert torch.equal(_out(loaded.eval(), x), expected)


@pytest.mark.parametrize("family, dtype", CASES)
def test_merge_unmerge_unload_and_disable(family, dtype):
    base, model = _model(family, dtype)
    x = _images(dtype)
    expected, plain = _out(model, x), _out(base, x)
    weights = {n: layer.get_base_layer().weight.clone() for n, layer in model.base_model.taps_layers()}
    tolerance = 1e-5 if dtype == "fp32" else 5e-2
    model.merge_adapter()
    torch.testing.assert_close(_out(model, x), expected, rtol=0, atol=tolerance)
    model.unmerge_adapter()
    assert all(torch.equal(layer.get_base_layer().weight, weights[n]) for n, layer in model.base_model.taps_layers())
    assert torch.equal(_out(model, x), expected)
    with model.disable_adapter():
        assert torch.equal(_out(model, x), plain)
    assert torch.equal(_out(model, x), expected)
    with torch.no_grad():
        for _, layer in model.base_model.taps_layers():
            layer.taps_scores["a"].fill_(0.0)
    closed = _out(model, x)  # what unload keeps: the head and norm copies, no delta
    unloaded = model.unload()  # the gated layers go back to the base's own, bit for bit
    for name, weight in weights.items():
        assert torch.equal(unloaded.get_submodule(name).weight, weight)
    torch.testing.assert_close(_out(unloaded, x), closed, rtol=0, atol=tolerance)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_16_bit_merge_and_unload_and_unload_return_a_model_that_runs(family, dtype, how):
    """With PEFT's default ``autocast_adapter_dtype=True`` the deltas of a 16-bit base are fp32 (head and norm copies
    keep the base dtype, as LoRA's); the plain model ``merge_and_unload`` / ``unload`` returns has the base dtype everywhere and gives the adapter's
    outputs (``unload``: those with every gate closed, as it drops the deltas and keeps the head and norm copies)."""
    from peft.utils.other import ModulesToSaveWrapper

    torch.manual_seed(0)
    half = HALF[dtype]
    model = get_peft_model(FAMILIES[family]().to(half), TAPSConfig(init_weights=False)).eval()
    with torch.no_grad():
        for wrapper in [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]:
            for p in wrapper.modules_to_save["default"].parameters():
                p.add_(torch.randn_like(p) * 0.05)  # the task's head and norms differ from the base's
        if how == "unload":
            for _, layer in model.base_model.taps_layers():
                layer.taps_scores["default"].fill_(0.0)
    x = _images("fp32").to(half)
    expected = _out(model, x)
    plain = getattr(model, how)()
    assert {p.dtype for p in plain.parameters() if p.is_floating_point()} == {half}
    out = _out(plain.eval(), x)
    assert out.dtype == half
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=2e-2 if dtype == "bf16" else 4e-3)


@pytest.mark.parametrize("family, dtype", CASES)
def test_mixed_batches_match_single_adapter_outputs(family, dtype):
    base, model = _model(family, dtype, adapters=("a", "b"))
    x = _images(dtype)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = _out(model, x)
    with model.disable_adapter():
        single["__base__"] = _out(model, x)
    names = ["a", "b", "__base__", "b"]
    mixed = _out_mixed(model, x, names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], rtol=0, atol=1e-5 if dtype == "fp32" else 2e-2)


def _out_mixed(model, x, names):
    with torch.no_grad():
        out = model(pixel_values=x, adapter_names=names) if hasattr(model.get_base_model(), "config") else model(
            x, adapter_names=names)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family, dtype", CASES)
def test_torch_compile_matches_eager(family, dtype):
    _, model = _model(family, dtype)
    x = _images(dtype)
    expected = _out(model, x)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    torch.testing.assert_close(_out(compiled, x), expected, rtol=0, atol=1e-5 if dtype == "fp32" else 1e-2)


@pytest.mark.parametrize("family, dtype", CASES)
def test_activation_checkpointing_gives_the_same_gradients(family, dtype):
    grads = []
    for checkpointing in (False, True):
        _, model = _model(family, dtype)
        model.train()
        base = model.get_base_model()
        if checkpointing:
            if hasattr(base, "gradient_checkpointing_enable"):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.set_grad_checkpointing(True)
        x = _images(dtype)
        logits(model, x).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("taps_delta" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6 if dtype == "fp32" else 1e-3)


@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_is_honoured_and_small_updates_survive_on_bf16(autocast, expected):
    """PEFT's ``autocast_adapter_dtype``: True (its default) keeps deltas in fp32 on a bf16 base, so 100 updates of
    1e-4 add up (in bf16 they round away); False keeps the base dtype (half the bytes). The head and norm copies keep
    the base dtype either way, exactly as LoRA's ``modules_to_save`` on the same base."""
    from peft import LoraConfig

    model = get_peft_model(tiny_timm_vit().to(torch.bfloat16), TAPSConfig(), autocast_adapter_dtype=autocast)
    lora = get_peft_model(tiny_timm_vit().to(torch.bfloat16), LoraConfig(target_modules=["qkv"], modules_to_save=["head"]),
                          autocast_adapter_dtype=autocast)
    layer = model.base_model.taps_layers()[0][1]
    delta = layer.taps_delta["default"]
    head = model.base_model.model.head.modules_to_save["default"]
    lora_head = lora.base_model.model.head.modules_to_save["default"]
    assert delta.dtype == expected and layer.taps_scores["default"].dtype == torch.float32
    assert head.weight.dtype == lora_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        delta.fill_(0.05)
        for _ in range(100):
            delta.add_(1e-4)
    if autocast:
        assert delta.float().mean().item() == pytest.approx(0.06, abs=1e-6)
    else:
        assert delta.float().mean().item() == pytest.approx(0.05, abs=1e-3)  # each 1e-4 rounds away in bf16
    out = model(_images("bf16"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_amp_trains_with_grad_scaler():
    """The standard AMP recipe (an fp32 model under fp16 autocast, a GradScaler) trains deltas, scores and head."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = get_peft_model(tiny_resnet(), TAPSConfig()).train()
    optimizer = optimizer_for(model, torch.optim.AdamW, lr=1e-2, score_lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _images("fp32"), torch.arange(4) % 5
    before = model.base_model.taps_layers()[0][1].taps_delta["default"].clone()
    losses = []
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(logits(model, x).float(), y) + model.taps_penalty()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not torch.equal(model.base_model.taps_layers()[0][1].taps_delta["default"], before)
