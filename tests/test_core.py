"""The TAPS tuner against PEFT's invariants for a method (design/peft-seam.md section 8), on tiny real models."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn

import taps_peft
from taps_peft import TAPSConfig, TAPSLayer, TAPSModel
from conftest import MODELS, logits, optimizer_for, tiny_hf_vit, tiny_resnet, tiny_timm_vit


def taps_layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


@torch.no_grad()
def set_scores(model, value):
    for layer in taps_layers(model):
        layer.taps_scores["default"].fill_(value)


# ----- registration and config -----


def test_registered_with_peft():
    assert PeftType.TAPS.value == "TAPS" and PeftType("TAPS") is PeftType.TAPS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TAPS] is TAPSConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TAPS] is TAPSModel
    taps_peft._register()  # importing twice (or reloading) must not raise


def test_config_round_trips(tmp_path):
    config = TAPSConfig(lam=0.25, tau=0.05, score_init=0.2, lam_warmup=0.3, total_step=7, score_lr=0.02,
                        target_modules=["qkv"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TAPSConfig) and loaded.peft_type == PeftType.TAPS
    assert (loaded.lam, loaded.tau, loaded.score_init, loaded.lam_warmup, loaded.total_step, loaded.score_lr) == (
        0.25, 0.05, 0.2, 0.3, 7, 0.02)
    assert loaded.target_modules == {"qkv"}
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lam": -1.0}, "lam"), ({"tau": 0.0}, "tau"), ({"score_init": 0.05}, "score_init"),
     ({"lam": float("nan")}, "lam"), ({"lam_warmup": -0.1}, "lam_warmup"), ({"score_lr": -1.0}, "score_lr"),
     ({"total_step": -2}, "total_step")],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"TAPSConfig\.{field}=.*invalid: use"):
        TAPSConfig(**kwargs)


# ----- injection and defaults -----


def test_default_targets_timm_vit():
    model = get_peft_model(tiny_timm_vit(depth=3), TAPSConfig())
    names = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, TAPSLayer)}
    expected = {f"blocks.{i}.{s}" for i in range(3) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert names == expected  # L = 12: no patch_embed.proj, no head
    config = model.peft_config["default"]
    assert config.modules_to_save[0] == "head"
    assert {"blocks.0.norm1", "blocks.2.norm2", "norm"} <= set(config.modules_to_save)


def test_default_targets_transformers_vit():
    model = get_peft_model(tiny_hf_vit(), TAPSConfig())
    names = sorted(n for n, m in model.named_modules() if isinstance(m, TAPSLayer))
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    assert len(names) == 2 * 6 and suffixes == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert "classifier" in model.peft_config["default"].modules_to_save


@pytest.mark.parametrize(
    "arch, expected_layers, head",
    [("resnet50", 53, "fc"), ("densenet121", 120, "classifier")],  # the paper's L for these networks
)
def test_default_targets_convnets_count_like_the_paper(arch, expected_layers, head):
    timm = pytest.importorskip("timm")
    model = get_peft_model(timm.create_model(arch, pretrained=False, num_classes=3), TAPSConfig())
    assert len(taps_layers(model)) == expected_layers
    assert model.peft_config["default"].modules_to_save[0] == head
    assert taps_peft.taps_summary(model)["total_layers"] == expected_layers


def test_default_targets_convnext_gate_convs_and_mlp_not_head():
    timm = pytest.importorskip("timm")
    base = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    n_gateable = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in base.modules()) - 2  # minus head.fc, patchify stem
    model = get_peft_model(base, TAPSConfig())
    assert len(taps_layers(model)) == n_gateable
    assert not any(n.startswith("stem.") for n in model.peft_config["default"].target_modules)
    assert model.peft_config["default"].modules_to_save[0] == "head.fc"
    assert "head.norm" in model.peft_config["default"].modules_to_save
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)


def test_target_forms_list_regex_exclude():
    base = tiny_timm_vit(depth=2)
    by_list = get_peft_model(copy.deepcopy(base), TAPSConfig(target_modules=["qkv", "fc2"]))
    assert len(taps_layers(by_list)) == 4
    by_regex = get_peft_model(copy.deepcopy(base), TAPSConfig(target_modules=r"blocks\.1\..*(qkv|fc1)"))
    assert len(taps_layers(by_regex)) == 2
    excluded = get_peft_model(copy.deepcopy(base), TAPSConfig(exclude_modules=["fc1", "fc2"]))
    assert len(taps_layers(excluded)) == 4


def test_no_match_names_what_was_searched():
    with pytest.raises(ValueError, match=r"target_modules: \['does_not_exist'\] matched no module.*blocks\.0\.attn\.qkv"):
        get_peft_model(tiny_timm_vit(), TAPSConfig(target_modules=["does_not_exist"]))


def test_unsupported_layer_type_names_module_and_fix():
    with pytest.raises(TypeError, match=r"blocks\.0\.norm1.*LayerNorm.*Remove it from `target_modules`"):
        get_peft_model(tiny_timm_vit(), TAPSConfig(target_modules=["blocks.0.norm1"], train_norms=False))


# ----- forward semantics -----


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init_and_only_adapter_trainable(name, images):
    base = MODELS[name]().eval()
    expected = logits(base, images)
    model = get_peft_model(base, TAPSConfig()).eval()
    torch.testing.assert_close(logits(model, images), expected, rtol=0, atol=0)
    for param_name, param in model.named_parameters():
        is_adapter = ".taps_" in param_name or ".modules_to_save.default." in param_name
        assert param.requires_grad == is_adapter, param_name
        assert ".default" in param_name or not is_adapter  # adapter name appears in parameter names


@pytest.mark.parametrize("name", list(MODELS))
def test_three_sgd_steps_change_adapter_not_base(name, images):
    model = get_peft_model(MODELS[name](), TAPSConfig(lam=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randint(0, 5, (images.shape[0],))
    for step in range(3):
        loss = F.cross_entropy(logits(model, images), target) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if p.requires_grad:
            # deltas, scores, head; a norm copy whose output feeds nothing differentiable may stay put
            if ".taps_" in n or ".head." in n or ".fc." in n or ".classifier." in n:
                assert changed, n
        else:
            assert not changed, n


def test_disable_adapter_gives_base_output(images):
    base = tiny_timm_vit().eval()
    expected = base(images)
    model = get_peft_model(base, TAPSConfig(init_weights=False)).eval()
    assert not torch.allclose(model(images), expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
    assert not torch.allclose(model(images), expected)  # state restored on exit


def test_every_targeted_layer_changes_the_output(images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False, train_norms=False)).eval()
    set_scores(model, 0.0)
    with torch.no_grad():
        base_out = model(images)
        for layer in taps_layers(model):
            layer.taps_scores["default"].fill_(1.0)
            assert not torch.allclose(model(images), base_out)
            layer.taps_scores["default"].fill_(0.0)


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("score", [0.3, 0.05])
def test_straight_through_gradients_match_hand_computation(score):
    model = get_peft_model(OneLinear(), TAPSConfig(target_modules=["lin"], init_weights=False, lam=0.0))
    layer = taps_layers(model)[0]
    layer.taps_scores["default"].data.fill_(score)
    x, target = torch.randn(5, 6), torch.randn(5, 4)
    F.mse_loss(model(x), target).backward()

    base = layer.get_base_layer()
    delta = layer.taps_delta["default"].detach()
    gate = float(score >= 0.1)
    w_eff = (base.weight.detach() + gate * delta).requires_grad_(True)
    F.mse_loss(F.linear(x, w_eff, base.bias.detach()), target).backward()
    torch.testing.assert_close(layer.taps_delta["default"].grad, gate * w_eff.grad)  # zeros when off, not None
    torch.testing.assert_close(layer.taps_scores["default"].grad, (w_eff.grad * delta).sum().reshape(1))
    assert base.weight.grad is None and base.bias.grad is None


@pytest.mark.parametrize("checkpointed", [None, "reentrant", "non_reentrant"])
def test_formed_weight_is_not_kept_for_backward_and_gradients_are_exact(monkeypatch, checkpointed):
    """The backward re-forms W_base + dW (saved-tensor hooks) instead of autograd keeping it, bit for bit; under
    activation checkpointing (non-reentrant: its own hooks, TAPS steps aside; reentrant: a no-grad forward that
    must cache nothing) the gradients are the same."""
    import weakref

    from timm.layers import StdConv2d

    from taps_peft.tuner import gated as layer_mod

    formed = []
    apply = layer_mod._GatedWeight.apply

    def recording_apply(*args):
        out = apply(*args)
        formed.append(weakref.ref(out))
        return out

    monkeypatch.setattr(layer_mod._GatedWeight, "apply", recording_apply)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), StdConv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))
    model = get_peft_model(net, TAPSConfig(target_modules=["0", "1", "3"], init_weights=False, lam=0.0))
    x = torch.randn(2, 3, 9, 9)
    if checkpointed:
        x.requires_grad_(checkpointed == "reentrant")  # reentrant checkpointing needs an input that requires grad
        reentrant = checkpointed == "reentrant"
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
    else:
        out = model(x)
    if checkpointed == "reentrant":  # a no-grad forward, re-run with grad in the backward: nothing may stay cached
        assert not formed
    else:
        assert len(formed) == 3
    if not checkpointed:
        assert all(ref() is None for ref in formed), "autograd still holds a formed weight"
    out.square().sum().backward()

    ref = copy.deepcopy(model.get_base_model())  # the same computation with plain weights W = W_base + dW
    ws = {}
    for name in ["0", "1", "3"]:
        layer = ref.get_submodule(name)
        ws[name] = (layer.get_base_layer().weight + layer.taps_delta["default"]).detach().requires_grad_(True)
    h = torch.func.functional_call(ref[0].get_base_layer(), {"weight": ws["0"]}, (x,))
    h = torch.func.functional_call(ref[1].get_base_layer(), {"weight": ws["1"]}, (h,))
    y = torch.func.functional_call(ref[3].get_base_layer(), {"weight": ws["3"]}, (h.flatten(1),))
    y.square().sum().backward()
    for name, layer in zip(["0", "1", "3"], taps_layers(model)):
        assert torch.equal(layer.taps_delta["default"].grad, ws[name].grad), name
        dot = (ws[name].grad * layer.taps_delta["default"].detach()).sum().reshape(1)
        torch.testing.assert_close(layer.taps_scores["default"].grad, dot)


@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_activation_checkpointing_gives_the_same_gradients(reentrant):
    model = get_peft_model(tiny_hf_vit(), TAPSConfig(init_weights=False, lam=0.3)).train()
    checkpointed = copy.deepcopy(model)
    vit = checkpointed.base_model.model
    vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        vit.enable_input_require_grads()
    x = torch.randn(2, 3, 32, 32)
    grads, calls = [], []
    for m in (model, checkpointed):
        taps_layers(m)[0].register_forward_hook(lambda *_: calls.append(1))
        (m(pixel_values=x).logits.square().sum() + m.taps_penalty()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert len(calls) == 3  # once plain, twice checkpointed (the forward, and its re-run in the backward)
    assert grads[0].keys() == grads[1].keys() and any("taps_delta" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


def test_double_backward_through_a_re_formed_weight():
    """create_graph=True through a weight re-formed in the backward: a gradient penalty on the input gradient (which
    runs through W) differentiates exactly (autograd re-attaches the saved weight's graph edge to the re-formed one)."""
    model = get_peft_model(OneLinear(), TAPSConfig(target_modules=["lin"], init_weights=False, lam=0.0))
    layer = taps_layers(model)[0]
    delta = layer.taps_delta["default"]
    x = torch.randn(5, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).pow(3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(gx.square().sum(), delta)

    base = layer.get_base_layer()
    w = (base.weight.detach() + delta.detach()).requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.linear(x, w, base.bias.detach()).pow(3).sum(), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(gx_ref.square().sum(), w)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gg, gg_ref)


def test_conv_layers_grouped_depthwise_conv1d_and_timm_subclasses():
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame, StdConv2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(4, 8, 3, groups=2, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, groups=8, padding=1)
            self.same = Conv2dSame(8, 8, 3, stride=2)
            self.std = StdConv2d(8, 8, 3, padding=1)
            self.conv1d = nn.Conv1d(8, 4, 3)

        def forward(self, x):
            x = self.std(self.same(self.depthwise(self.grouped(x))))
            return self.conv1d(x.flatten(2))

    base = Net().eval()
    model = get_peft_model(base, TAPSConfig(target_modules=list(base._modules), init_weights=False)).eval()
    x = torch.randn(2, 4, 9, 9)
    # reference: each base module run with its own forward on W + dW
    ref = copy.deepcopy(model.get_base_model())
    expected = x
    for name in ["grouped", "depthwise", "same", "std", "conv1d"]:
        layer = getattr(ref, name)
        w = layer.get_base_layer().weight + layer.get_delta_weight("default")
        if name == "conv1d":
            expected = expected.flatten(2)
        expected = torch.func.functional_call(layer.get_base_layer(), {"weight": w}, (expected,))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_inactive_layers_cost_nothing_in_eval_and_active_ones_follow_updates(images, monkeypatch):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).eval()
    calls = []
    original = TAPSLayer._functional_forward
    monkeypatch.setattr(TAPSLayer, "_functional_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    set_scores(model, 0.0)
    with torch.no_grad():
        off = model(images)
        with model.disable_adapter():
            base = model(images)
    assert not calls  # every layer ran as the plain base layer
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    set_scores(model, 1.0)
    with torch.no_grad():
        first = model(images)
        assert calls
        layer = taps_layers(model)[0]
        layer.taps_delta["default"].add_(0.5)  # an in-place update (as an optimizer step) is seen at once
        second = model(images)
    assert not torch.allclose(first, second)
    model.train()
    with torch.enable_grad():
        torch.testing.assert_close(model(images), second)  # the training path computes the same function


# ----- norms -----


def test_batchnorm_is_task_specific_and_base_stats_do_not_drift(images):
    model = get_peft_model(tiny_resnet(), TAPSConfig())
    bn_wrapper = model.base_model.model.bn1
    base_mean = bn_wrapper.original_module.running_mean.clone()
    model.train()
    for _ in range(2):
        model(images)
    torch.testing.assert_close(bn_wrapper.original_module.running_mean, base_mean, rtol=0, atol=0)
    assert not torch.equal(bn_wrapper.modules_to_save["default"].running_mean, base_mean)
    assert bn_wrapper.modules_to_save["default"].weight.requires_grad


def test_train_norms_false_keeps_norms_frozen():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(train_norms=False))
    assert model.peft_config["default"].modules_to_save == ["head"]
    assert not any("norm" in n for n, p in model.named_parameters() if p.requires_grad)


# ----- penalty, optimizer, report, dtype -----


def test_report_and_summary(capsys):
    model = get_peft_model(tiny_timm_vit(depth=2), TAPSConfig())
    layers = taps_layers(model)
    for layer in layers[:5]:
        layer.taps_scores["default"].data.fill_(0.0)
    rows = taps_peft.taps_layer_report(model)
    assert [r["active"] for r in rows] == [False] * 5 + [True] * 3
    summary = taps_peft.taps_summary(model)
    assert (summary["active_layers"], summary["total_layers"]) == (3, 8)
    active_params = sum(r["params"] for r in rows if r["active"])
    assert summary["task_specific_params"] > active_params
    base_params = sum(p.numel() for p in tiny_timm_vit(depth=2).parameters())
    assert summary["base_params"] == base_params
    taps_peft.print_taps_summary(model, show_layers=True)
    out = capsys.readouterr().out
    assert "active layers: 3/8 (37.5%)" in out and "blocks.0.attn.qkv" in out


def test_bf16_base_trains(images):
    model = get_peft_model(tiny_timm_vit().to(torch.bfloat16), TAPSConfig(init_weights=False))
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    (out.float().sum() + model.taps_penalty()).backward()
    layer = taps_layers(model)[0]
    assert layer.taps_scores["default"].dtype == torch.float32
    assert layer.taps_delta["default"].grad is not None and layer.taps_scores["default"].grad is not None


def test_merge_and_unmerge_round_trip(images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).eval()
    taps_layers(model)[0].taps_scores["default"].data.fill_(0.0)  # one inactive layer must not be merged
    with torch.no_grad():
        unmerged = model(images)
        model.merge_adapter()
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)


def test_loading_round_trip_through_peft(tmp_path, images):
    base = tiny_timm_vit()
    fresh_base = copy.deepcopy(base)
    model = get_peft_model(base, TAPSConfig(init_weights=False)).eval()
    with torch.no_grad():
        expected = model(images)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected)


def test_save_keeps_only_active_deltas_and_loads_without_warnings(tmp_path, images, recwarn):
    from safetensors.torch import load_file

    base = tiny_timm_vit()
    fresh_base = copy.deepcopy(base)
    model = get_peft_model(base, TAPSConfig(init_weights=False)).eval()
    layers = taps_layers(model)
    with torch.no_grad():
        for layer in layers[:5]:
            layer.taps_scores["default"].fill_(0.05)
        expected = model(images)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    deltas = [k for k in saved if ".taps_delta" in k]
    assert len(deltas) == 3 and len([k for k in saved if ".taps_scores" in k]) == 8
    assert sum(saved[k].numel() for k in deltas) == sum(layer.taps_delta["default"].numel() for layer in layers[5:])
    assert any("running" not in k and "norm1" in k for k in saved) and any(".head." in k for k in saved)

    recwarn.clear()
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path, low_cpu_mem_usage=True).eval()
    assert not [w for w in recwarn if "missing adapter keys" in str(w.message)]
    assert all(p.device.type != "meta" for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)


def test_saving_with_every_gate_closed_warns_and_names_the_knobs(tmp_path):
    """An adapter whose gates all closed (the 🤗 Trainer's default lr 5e-5 does that on the main job) holds no delta:
    saving it says so, and what keeps layers open; one open gate is a normal save."""
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
    set_scores(model, 0.05)
    with pytest.warns(UserWarning, match=r"'default' is saved with no task-specific layer: every gate is closed "
                                         r"\(each score < tau=0\.1\).*smaller lam \(now 0\.5\)"):
        model.save_pretrained(tmp_path / "closed")
    with torch.no_grad():
        taps_layers(model)[0].taps_scores["default"].fill_(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "one_open")


def test_torch_compile_trains_like_eager():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    base = tiny_timm_vit()

    def losses(compiled):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), TAPSConfig(lam=0.5))
        set_scores(model, 0.3)
        with torch.no_grad():
            taps_layers(model)[1].taps_scores["default"].fill_(0.05)  # a closed gate
            taps_layers(model)[2].taps_scores["default"].fill_(0.1001)  # one that closes during training
        opt = optimizer_for(model, torch.optim.SGD, lr=0.05, score_lr=0.02)
        forward = torch.compile(model) if compiled else model
        out = []
        for step in range(3):
            loss = F.cross_entropy(forward(x), y) + model.taps_penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
            if step == 0:  # the closed gate stays closed, the other one closed at this step
                assert [m.is_active("default") for m in taps_layers(model)][1:3] == [False, False]
        return out

    torch.testing.assert_close(losses(True), losses(False), rtol=1e-5, atol=1e-6)


def test_gates_follow_fused_optimizer_steps(images):
    # fused optimizers update parameters in place without bumping version counters
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=1.0))
    opt = optimizer_for(model, torch.optim.AdamW, lr=1e-3, score_lr=0.1, fused=True)
    assert all(layer.is_active("default") for layer in taps_layers(model))
    for step in range(2):
        (model(images).square().mean() + model.taps_penalty()).backward()
        opt.step()
        opt.zero_grad()
    scores = [layer.taps_scores["default"].item() for layer in taps_layers(model)]
    assert min(scores) < 0.1  # some gates closed ...
    assert [layer.is_active("default") for layer in taps_layers(model)] == [s >= 0.1 for s in scores]  # ... and seen
