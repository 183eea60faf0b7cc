"""Adapter lifecycle: save only active deltas, load, merge/unmerge/unload, many adapters on one base."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from taps_peft import TAPSConfig, TAPSLayer
from conftest import MODELS, logits, optimizer_for, tiny_timm_vit


def taps_layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


def trained(base, images, adapter="default", closed=(0, 2), steps=3, seed=0):
    """A TAPS model after a few real optimizer steps (deltas, norms, BN stats and head all move); some gates closed."""
    torch.manual_seed(seed)
    model = get_peft_model(base, TAPSConfig(lam=0.1), adapter_name=adapter)
    opt = optimizer_for(model, torch.optim.AdamW, lr=1e-2, score_lr=1e-3)
    target = torch.randint(0, 5, (len(images),))
    for step in range(steps):
        loss = F.cross_entropy(logits(model, images), target) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i in closed:
            taps_layers(model)[i].taps_scores[adapter].fill_(0.05)
    return model.eval()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_save_load_is_exact_and_holds_only_active_deltas(family, tmp_path, images, recwarn):
    base = MODELS[family]()
    fresh = copy.deepcopy(base)
    model = trained(base, images)
    with torch.no_grad():
        expected = logits(model, images)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    layers = taps_layers(model)
    active = [m for m in layers if m.is_active("default")]
    deltas = [k for k in saved if k.endswith(".taps_delta")]
    assert len(deltas) == len(active) == len(layers) - 2
    assert len([k for k in saved if k.endswith(".taps_scores")]) == len(layers)
    assert sum(saved[k].numel() for k in deltas) == sum(m.taps_delta["default"].numel() for m in active)
    if family == "timm_resnet":
        assert any(k.endswith("running_mean") for k in saved)  # BN stats travel with the adapter
    payload = sum(t.nbytes for t in saved.values())
    assert payload <= os.path.getsize(tmp_path / "adapter_model.safetensors") <= payload + 64 * 1024

    recwarn.clear()
    loaded = PeftModel.from_pretrained(fresh, tmp_path, low_cpu_mem_usage=True).eval()
    assert not [w for w in recwarn if "missing" in str(w.message).lower()]
    assert all(p.device.type != "meta" for p in loaded.parameters())
    assert [m.is_active("default") for m in taps_layers(loaded)] == [m.is_active("default") for m in layers]
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, images), expected, rtol=0, atol=0)


def test_save_inactive_deltas_keeps_a_resumable_checkpoint(tmp_path, images):
    base = tiny_timm_vit()
    fresh = copy.deepcopy(base)
    model = trained(base, images)
    closed = taps_layers(model)[0]
    delta = closed.taps_delta["default"].detach().clone()
    assert delta.abs().sum() > 0  # trained while the gate was open
    model.peft_config["default"].save_inactive_deltas = True
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len([k for k in saved if k.endswith(".taps_delta")]) == len(taps_layers(model))

    resumed = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    layer = taps_layers(resumed)[0]
    assert not layer.is_active("default")
    with torch.no_grad():
        layer.taps_scores["default"].fill_(0.5)  # the gate reopens: its delta is still there
    torch.testing.assert_close(layer.get_delta_weight("default"), delta)


def test_loading_onto_the_wrong_base_fails_clearly(tmp_path, images):
    model = trained(tiny_timm_vit(), images)
    model.save_pretrained(tmp_path)
    timm = pytest.importorskip("timm")
    wider = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2, embed_dim=96, num_heads=3)
    with pytest.raises(ValueError, match="does not fit this base model.*shape"):
        PeftModel.from_pretrained(wider, tmp_path)
    deeper = tiny_timm_vit(depth=3)
    model3 = trained(deeper, images)
    path3 = tmp_path / "deep"
    model3.save_pretrained(path3)
    with pytest.raises(ValueError, match="matched no module.*does not fit this base model"):
        PeftModel.from_pretrained(tiny_timm_vit(depth=2), path3)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_merge_unmerge_unload_and_disable(family, images):
    base = MODELS[family]()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_out = logits(copy.deepcopy(base).eval(), images)
    model = trained(base, images)
    with torch.no_grad():
        unmerged = logits(model, images)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(logits(model, images), unmerged, atol=1e-5, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, images), unmerged, atol=0, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, images), base_out, atol=0, rtol=0)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, TAPSLayer) for m in merged.modules())
        torch.testing.assert_close(logits(merged.eval(), images), unmerged, atol=1e-5, rtol=1e-4)
        saved_modules = {n for n, m in model.named_modules() if hasattr(m, "modules_to_save")}
        assert model.base_model.taps_layers()
        for layer in taps_layers(model):
            layer.taps_scores["default"].fill_(0.0)
        closed = logits(model, images)  # what unload keeps: the trained head and norms, no delta
        unloaded = model.unload()  # as in PEFT: gated deltas dropped, trained head/norms (modules_to_save) kept
        torch.testing.assert_close(logits(unloaded.eval(), images), closed, atol=0, rtol=0)
    assert not any(isinstance(m, TAPSLayer) for m in unloaded.modules())
    assert model.base_model.taps_layers() == []  # the tuner's cached layer list follows
    kept = {n.removeprefix("base_model.model.") for n in saved_modules}
    for key, value in unloaded.state_dict().items():
        if key.rpartition(".")[0] not in kept:
            assert torch.equal(value, original[key]), key  # every gated layer is the base again, bit for bit


def torchvision_vit():
    """A one-block torchvision ViT: its ``nn.MultiheadAttention`` reads ``out_proj.weight`` instead of calling it."""
    models = pytest.importorskip("torchvision.models")
    net = models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                                   num_classes=5)
    torch.nn.init.normal_(net.heads.head.weight, std=0.1)  # torchvision starts its head at zero
    return net


@pytest.mark.filterwarnings("ignore:1 nn.MultiheadAttention module")
@pytest.mark.parametrize("make", [torchvision_vit, tiny_timm_vit], ids=["torchvision_vit", "timm_vit"])
def test_disable_adapter_while_merged_gives_the_base_model(make, images):
    """PEFT's ``test_disable_adapters_with_merging``: merged, then disabled, the outputs are the base model's, also
    where a parent reads a gated weight instead of calling the layer (``nn.MultiheadAttention``'s ``out_proj``);
    after the context the task's outputs return, unmerged, as PEFT's LoRA leaves them."""
    base = make().eval()
    with torch.no_grad():
        plain = logits(copy.deepcopy(base), images)
    model = trained(base, images, closed=())
    layers = dict(model.base_model.taps_layers())
    assert make is tiny_timm_vit or any(n.endswith("self_attention.out_proj") for n in layers)
    with torch.no_grad():
        unmerged = logits(model, images)
        assert not torch.allclose(unmerged, plain, atol=1e-3)
        model.merge_adapter()
        merged = logits(model, images)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, images), plain, atol=1e-5, rtol=1e-5)
            assert all(torch.equal(m.weight, m.get_base_layer().weight) for m in layers.values())
        torch.testing.assert_close(logits(model, images), merged, atol=1e-5, rtol=1e-4)
    assert not any(m.merged for m in layers.values())  # as LoRA: a disabled layer unmerges, and stays unmerged
    with torch.no_grad():
        assert torch.equal(logits(model, images), unmerged)


def test_safe_merge_refuses_a_broken_adapter(images):
    model = trained(tiny_timm_vit(), images)
    with torch.no_grad():
        taps_layers(model)[1].taps_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)


# ----- many tasks on one base -----


def two_task_model(tmp_path, images):
    """A base with adapters 'a' and 'b' loaded from disk, each with different closed gates."""
    base = tiny_timm_vit()
    pristine = copy.deepcopy(base)
    outs = {}
    for name, closed, seed in [("a", (0, 1, 2, 3), 1), ("b", (1, 2, 3, 5), 2)]:
        model = trained(copy.deepcopy(base), images, closed=closed, seed=seed)
        with torch.no_grad():
            outs[name] = logits(model, images)
        model.save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(pristine, tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad(), model.disable_adapter():
        outs["__base__"] = logits(model.eval(), images)
    return model.eval(), outs


def test_load_set_and_delete_adapters(tmp_path, images):
    model, outs = two_task_model(tmp_path, images)
    with torch.no_grad():
        for name in ["a", "b", "a"]:
            model.set_adapter(name)
            torch.testing.assert_close(logits(model, images), outs[name], rtol=0, atol=0)
    model.delete_adapter("b")
    assert all("b" not in m.taps_delta for m in taps_layers(model))
    assert list(model.peft_config) == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(logits(model, images), outs["a"], rtol=0, atol=0)


def test_only_the_active_adapter_trains_through_adds_loads_switches_and_deletes(tmp_path, images):
    """TAPS's set_adapter touches only the old and new adapters (a switch costs the same with 50 loaded); the
    trainable set stays exactly PEFT's: the active adapter's deltas, scores, head and norms, nothing else."""
    trained(tiny_timm_vit(), images).save_pretrained(tmp_path / "saved")
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())

    def expect(active, trainable=True):
        for name, p in model.named_parameters():
            owner = next((a for a in model.peft_config if f".{a}." in name or name.endswith(f".{a}")), None)
            assert p.requires_grad == (trainable and owner == active), (name, active)
        assert model.active_adapter == active

    expect("default")
    model.add_adapter("b", TAPSConfig())
    expect("default")
    model.set_adapter("b")
    expect("b")
    model.load_adapter(tmp_path / "saved", adapter_name="c")
    expect("b")
    model.load_adapter(tmp_path / "saved", adapter_name="d", is_trainable=True)
    model.set_adapter("d")  # (PEFT leaves an inactive adapter's head/norm copies trainable after is_trainable=True)
    expect("d")
    model.set_adapter("c", inference_mode=True)
    expect("c", trainable=False)
    model.set_adapter("default")
    model.delete_adapter("d")
    expect("default")


def test_switch_work_does_not_grow_with_the_adapters_loaded(monkeypatch):
    """A switch (set_adapter, merged or not) visits the same parameters with 3 or 12 adapters loaded."""
    calls = []
    requires_grad_ = torch.Tensor.requires_grad_
    monkeypatch.setattr(torch.Tensor, "requires_grad_", lambda t, flag=True: calls.append(t) or requires_grad_(t, flag))

    def switch_cost(n_adapters):
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(), adapter_name="t0")
        for i in range(1, n_adapters):
            model.add_adapter(f"t{i}", TAPSConfig())
        calls.clear()
        model.set_adapter("t1")
        unmerged = len(calls)
        model.merge_adapter()
        model.unmerge_adapter()
        model.set_adapter("t2")
        model.merge_adapter()
        return unmerged, len(calls)

    assert switch_cost(3) == switch_cost(12)


def test_mixed_task_batches_route_each_sample(tmp_path, images):
    model, outs = two_task_model(tmp_path, images)
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        mixed = model(images, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(images, adapter_names=["a", "typo", "a", "a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(images, adapter_names=names)


def test_merged_task_switch_touches_only_the_active_layers(tmp_path, images):
    model, outs = two_task_model(tmp_path, images)
    layers = taps_layers(model)
    touched_by = {n: {i for i, m in enumerate(layers) if m.is_active(n)} for n in ("a", "b")}
    original = [m.get_base_layer().weight.data_ptr() for m in layers]
    with torch.no_grad():
        model.set_adapter("a")
        model.merge_adapter()
        torch.testing.assert_close(logits(model, images), outs["a"], atol=1e-5, rtol=1e-4)
        before = [m.get_base_layer().weight.data_ptr() for m in layers]
        model.unmerge_adapter()
        model.set_adapter("b")
        model.merge_adapter()
        torch.testing.assert_close(logits(model, images), outs["b"], atol=1e-5, rtol=1e-4)
    after = [m.get_base_layer().weight.data_ptr() for m in layers]
    shared = set(range(len(layers))) - touched_by["a"] - touched_by["b"]
    assert shared and all(before[i] == after[i] == original[i] for i in shared)  # never touched
    assert all(layers[i]._unmerged_weight is not None for i in touched_by["b"])


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, images, monkeypatch):
    """``save_adapter`` (what the CLI and TAPSTrainer use) replaces each file atomically: a save that fails part-way
    leaves the previous adapter as it was. PEFT's own ``save_pretrained`` writes in place; a folder it left
    half-written is refused when loading, never loaded silently."""
    import peft.peft_model

    import taps_peft

    model = trained(tiny_timm_vit(), images)
    taps_peft.save_adapter(model, tmp_path / "atomic")
    model.save_pretrained(tmp_path / "peft")
    before = {p.name: p.read_bytes() for p in (tmp_path / "atomic").iterdir()}

    def crash(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with torch.no_grad():
        taps_layers(model)[3].taps_scores["default"].fill_(0.0)
    with pytest.raises(OSError, match="disk full"):
        taps_peft.save_adapter(model, tmp_path / "atomic")
    assert {p.name: p.read_bytes() for p in (tmp_path / "atomic").iterdir()} == before  # and no stray temporary file
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        PeftModel.from_pretrained(tiny_timm_vit(), tmp_path / "peft")


def test_adapters_loaded_for_inference_hold_memory_only_for_active_layers(tmp_path, images):
    """Loaded for inference, an adapter holds a delta only where its gate is open (its closed layers keep their score
    and use the base weight); unfrozen later it trains without error (the closed layers stay shared)."""
    model, outs = two_task_model(tmp_path, images)  # loaded with is_trainable=False (the default)
    for name in ("a", "b"):
        layers = [m for m in taps_layers(model) if name in m.taps_scores]
        with_delta = [m for m in layers if name in m.taps_delta]
        assert with_delta == [m for m in layers if m.is_active(name)] and 0 < len(with_delta) < len(layers)
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(logits(model, images), outs[name], rtol=0, atol=0)
    model.base_model.set_adapter("a")  # unfrozen (inference_mode=False): trainable, and an optimizer step works
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        (logits(model.train(), images).square().mean() + model.taps_penalty()).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(logits(model.eval(), images), outs["a"])
    trainable = PeftModel.from_pretrained(tiny_timm_vit(), tmp_path / "a", is_trainable=True)
    assert all("default" in m.taps_delta for m in taps_layers(trainable))  # training keeps every delta


def test_reloading_into_an_adapter_loaded_for_inference(tmp_path, images):
    """The same file again, and a later checkpoint in which a layer closed at first load is open."""
    base = tiny_timm_vit()
    model = trained(copy.deepcopy(base), images, closed=(0,))
    model.save_pretrained(tmp_path / "early")
    with torch.no_grad():
        taps_layers(model)[0].taps_scores["default"].fill_(0.3)  # reopens later in training
    model.save_pretrained(tmp_path / "late")
    with torch.no_grad():
        late = logits(model.eval(), images)
    served = PeftModel.from_pretrained(base, tmp_path / "early")
    assert "default" not in taps_layers(served)[0].taps_delta  # closed: no delta held
    served.load_adapter(tmp_path / "early", adapter_name="default")
    served.load_adapter(tmp_path / "late", adapter_name="default")
    assert "default" in taps_layers(served)[0].taps_delta
    with torch.no_grad():
        assert torch.equal(logits(served.eval(), images), late)
