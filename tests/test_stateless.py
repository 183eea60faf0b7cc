"""The stateless core (issue 12): host reads counted, outputs never stale, no process-wide side effects, and each
bug of the first release with the test that would have caught it."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import taps_peft
from taps_peft import TAPSConfig, TAPSLayer
from conftest import HANG, logits, optimizer_for, tiny_hf_vit, tiny_resnet, tiny_timm_vit

ROOT = Path(__file__).resolve().parents[1]

_HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique"}


class HostReads(TorchDispatchMode):
    """Counts operations that copy a value to the host (on a GPU, each is a device sync): ``.item()``, ``bool()``,
    ``float()``, ``torch.equal``, data-dependent shapes, and ``Tensor.tolist()`` (patched: it reads memory directly)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads = self.reads

        def tolist(t):
            reads.append("tolist")
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def taps_layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


@torch.no_grad()
def randomize(model, adapter, seed, closed=()):
    """Non-zero deltas, head and norms; scores 0.15 except ``closed`` (0.05)."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(taps_layers(model)):
        if adapter in layer.taps_delta:
            layer.taps_delta[adapter].copy_(torch.randn(layer.taps_delta[adapter].shape, generator=g) * 0.05)
            layer.taps_scores[adapter].fill_(0.05 if i in closed else 0.15)
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            for p in m.modules_to_save[adapter].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def reference_logits(model, x):
    """The oracle: a plain copy of the base in which every TAPS layer is a plain layer with
    W = W_base + sum over active adapters of 1[s >= tau] * dW (computed here, not by taps_peft), and every wrapper
    is its active adapter's copy."""
    active = model.active_adapters
    plain = copy.deepcopy(model.get_base_model())
    for name, m in list(plain.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(m, TAPSLayer):
            layer = m.get_base_layer()
            w = layer.weight.detach().clone()
            for a in active:
                if a in m.taps_delta and float(m.taps_scores[a].detach()) >= m.taps_tau[a]:
                    w += m.taps_delta[a].detach()
            layer.weight = nn.Parameter(w)
            setattr(plain.get_submodule(parent_name), child, layer)
        elif isinstance(m, ModulesToSaveWrapper):
            chosen = next((m.modules_to_save[a] for a in active if a in m.modules_to_save), m.original_module)
            setattr(plain.get_submodule(parent_name), child, chosen)
    with torch.no_grad():
        return logits(plain.eval(), x)


def current_logits(model, x):
    with torch.no_grad():
        return logits(model.eval(), x)


# ----- host reads, counted -----


@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_resnet], ids=["vit", "resnet"])
def test_a_training_step_reads_nothing_on_the_host(make, images):
    """Forward, penalty, backward and TAPS's part of two optimizer steps (the lam schedule and the scores' Adam step:
    what the optimizer-step hook runs) in training: every gate and score stays on the device (on a GPU: no
    sync). torch's own CPU AdamW reads its step counters, so its step runs outside the count."""
    model = get_peft_model(make(), TAPSConfig(lam=0.5, lam_warmup=0.5, total_step=4))
    with torch.no_grad():
        taps_layers(model)[0].taps_scores["default"].fill_(0.05)  # a closed gate too
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(2):
        with HostReads() as counter:
            (F.cross_entropy(model(images), torch.arange(4) % 5) + model.taps_penalty()).backward()
            assert taps_peft.step_scores(model, optimizer) == len(taps_layers(model))
        assert counter.reads == []
        if i == 0:
            assert all(layer.taps_delta["default"].grad is not None for layer in taps_layers(model))  # DDP-safe
        optimizer.step()
        optimizer.zero_grad()


def test_an_inference_forward_reads_the_gates_once_whatever_the_depth(images):
    counts = []
    for depth in (2, 4):
        model = get_peft_model(tiny_timm_vit(depth=depth), TAPSConfig()).eval()
        with torch.no_grad(), HostReads() as counter:
            model(images)
        counts.append(counter.reads)
    assert counts == [["tolist"], ["tolist"]]


@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_resnet, tiny_hf_vit], ids=["vit", "resnet", "hf-vit"])
def test_a_forward_never_forms_a_weight_through_layer_weight(make, images, monkeypatch):
    """``layer.weight`` (the gated weight, for parents that read it instead of calling the layer: timm's EVA) is never
    read by a forward of a model whose parents call their layers, in training or inference: it costs those forwards
    nothing (docs/performance.md has the zoo's counts)."""
    reads = []
    read = TAPSLayer.weight.fget
    monkeypatch.setattr(TAPSLayer, "weight", property(lambda layer: reads.append(layer) or read(layer)))
    model = get_peft_model(make(), TAPSConfig())
    for mode, grad in (("train", True), ("eval", False)):
        getattr(model, mode)()
        with torch.set_grad_enabled(grad):
            model(pixel_values=images) if make is tiny_hf_vit else model(images)
    assert reads == []


# ----- outputs never stale -----


def test_delete_and_reload_under_one_name_never_serves_the_old_gates(tmp_path, images):
    base = tiny_timm_vit()
    for seed, closed in enumerate([(0, 1), (2, 3, 4), (), (5, 6, 7)]):
        model = get_peft_model(copy.deepcopy(base), TAPSConfig())
        randomize(model, "default", seed, closed)
        model.save_pretrained(tmp_path / str(seed))
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "0", adapter_name="keep")
    for i in range(12):
        source = tmp_path / str(i % 4)
        model.load_adapter(source, adapter_name="x")
        model.set_adapter("x")
        current_logits(model, images)  # a forward between loads, as a server would run
        torch.testing.assert_close(current_logits(model, images), reference_logits(model, images), rtol=0, atol=1e-6)
        fresh = PeftModel.from_pretrained(copy.deepcopy(base), source)
        torch.testing.assert_close(current_logits(model, images), current_logits(fresh, images), rtol=0, atol=0)
        model.set_adapter("keep")
        model.delete_adapter("x")


def test_load_state_dict_and_set_peft_model_state_dict_take_effect_at_once(images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig()).eval()
    other = get_peft_model(tiny_timm_vit(), TAPSConfig())
    other.load_state_dict(model.state_dict())
    randomize(other, "default", 1, closed=(0, 3))
    current_logits(model, images)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(current_logits(model, images), reference_logits(model, images), rtol=0, atol=1e-6)
    randomize(other, "default", 2, closed=(1, 2, 5))
    from peft import get_peft_model_state_dict

    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    torch.testing.assert_close(current_logits(model, images), reference_logits(model, images), rtol=0, atol=1e-6)
    torch.testing.assert_close(current_logits(model, images), current_logits(other, images), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_eval_outputs_follow_optimizer_steps(fused, images):
    """Fused optimizers update parameters in place without bumping version counters: nothing keyed on them."""
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=2.0))
    opt = optimizer_for(model, torch.optim.AdamW, lr=1e-2, score_lr=0.05, fused=fused)
    for step in range(4):
        model.train()
        (logits(model, images).square().mean() + model.taps_penalty()).backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(current_logits(model, images), reference_logits(model, images), rtol=0,
                                   atol=1e-5)
    assert any(not layer.is_active("default") for layer in taps_layers(model))  # some gates closed on the way


def test_several_adapters_active_at_once_add_their_open_deltas(images):
    config = dict(modules_to_save=[], train_norms=False)  # PEFT's head/norm wrappers take one adapter at a time
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(**config), adapter_name="a")
    model.add_adapter("b", TAPSConfig(**config))
    randomize(model, "a", 1, closed=(0, 1))
    randomize(model, "b", 2, closed=(1, 4))
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    torch.testing.assert_close(current_logits(model, images), reference_logits(model, images), rtol=0, atol=1e-6)


# ----- no process-wide side effects -----

_GLOBAL_HOOKS = textwrap.dedent("""
    import json, torch, torch.nn.modules.module as m, torch.optim.optimizer as o
    registrations = []  # every call that installs a global hook, even one removed right after
    for mod in (m, o):
        for name in [n for n in dir(mod) if n.startswith("register_") and "global" in n or
                     n.startswith(("register_module_", "register_optimizer_step_"))]:
            original = getattr(mod, name)
            setattr(mod, name, lambda *a, _o=original, _n=name, **k: (registrations.append(_n), _o(*a, **k))[1])
    def hooks():
        return {name: len(getattr(mod, name)) for mod, names in [
            (m, ["_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks", "_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks"]),
            (o, ["_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"])] for name in names}
    before = hooks()
    import peft, taps_peft, tempfile
    from peft import LoraConfig, PeftModel, get_peft_model
    peft_class = dict(vars(PeftModel))
    after_import = hooks()
    import timm
    vit = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    taps = get_peft_model(vit(), taps_peft.TAPSConfig())
    folder = tempfile.mkdtemp()
    taps.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(vit(), folder)
    loaded.load_adapter(folder, adapter_name="second")
    after_taps = hooks()
    lora = get_peft_model(vit(), LoraConfig(target_modules=["qkv"]))
    print(json.dumps({"before": before, "after_import": after_import, "after_taps": after_taps,
                      "registrations": registrations, "class_unchanged": dict(vars(PeftModel)) == peft_class,
                      "lora_own": sorted(k for k in vars(lora) if not k.startswith("_") and callable(vars(lora)[k])),
                      "taps_own": sorted(k for k in vars(taps) if not k.startswith("_") and callable(vars(taps)[k]))
                      + sorted(k for k in vars(loaded) if not k.startswith("_") and callable(vars(loaded)[k]))}))
""")


def test_import_and_use_leave_no_global_hook_but_the_score_step_and_lora_untouched():
    """Importing taps_peft installs no torch global hook; building, saving and loading TAPS models install exactly
    one, torch's optimizer-step pre-hook through which TAPS steps its scores (taps_peft.scores; it lives while a TAPS
    model does: tests/test_scores.py), and replace no PeftModel method (on the class or an instance): PEFT's own save
    and load run."""
    out = subprocess.run([sys.executable, "-c", _GLOBAL_HOOKS], capture_output=True, text=True, timeout=HANG,
                         cwd=ROOT, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["before"] == seen["after_import"]
    assert seen["after_taps"] == {**seen["before"], "_global_optimizer_pre_hooks": 1}
    assert seen["registrations"] == ["register_optimizer_step_pre_hook"] and seen["class_unchanged"]
    assert seen["lora_own"] == [] and seen["taps_own"] == []


def test_the_package_patches_nothing_of_peft_or_torch():
    """No source of taps_peft inspects stack frames, registers global hooks or assigns PeftModel methods; the one
    global hook is torch's public optimizer-step pre-hook, in taps_peft/scores.py only."""
    import re as _re

    forbidden = _re.compile(r"_getframe|register_module_(module_)?registration_hook|register_optimizer_step_post"
                            r"_hook|setattr\(\w+, *[\"'](save_pretrained|load_adapter|push_to_hub)|renameat2|os\.kill|"
                            r"os\.chown|ctypes")
    for path in sorted((ROOT / "taps_peft").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{path.name}:{number}: {line.strip()}"
            if "register_optimizer_step_pre_hook(" in line:
                assert path.name == "scores.py", f"{path.name}:{number}: {line.strip()}"


def test_deleting_a_model_frees_it_without_the_cyclic_collector(images):
    """No reference cycle keeps a TAPS model (and its memory) alive after ``del``."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False))
        model(images).sum().backward()
        ref = weakref.ref(model.base_model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_lora_save_and_load_are_byte_identical_with_taps_peft_imported(tmp_path):
    script = textwrap.dedent("""
        import sys, torch, timm
        if sys.argv[2] == "taps": import taps_peft  # noqa: F401
        from peft import LoraConfig, PeftModel, get_peft_model
        torch.manual_seed(0)
        make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
        model = get_peft_model(make(), LoraConfig(target_modules=["qkv"], init_lora_weights=False))
        model.save_pretrained(sys.argv[1])
        loaded = PeftModel.from_pretrained(make(), sys.argv[1])
        torch.save(loaded(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))), sys.argv[1] + ".out")
    """)
    for mode in ("plain", "taps"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / mode), mode], check=True, cwd=ROOT, timeout=HANG)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "taps" / name).read_bytes(), name
    plain, taps = (torch.load(tmp_path / f"{m}.out", weights_only=True) for m in ("plain", "taps"))
    assert torch.equal(plain, taps)


# ----- the first release's bugs, one test each -----


def test_an_interrupted_gate_read_leaves_no_hook_behind(images, monkeypatch):
    """A Ctrl-C while the host waits for the gates must not leave mixed-batch hooks on the model."""
    import taps_peft.tuner.model as tuner_model

    model = get_peft_model(tiny_timm_vit(), TAPSConfig()).eval()
    with torch.no_grad():
        expected = model(images)
    monkeypatch.setattr(tuner_model, "read_gates", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(images, adapter_names=["default", "__base__", "default", "__base__"])
    monkeypatch.undo()
    from taps_peft.scores import LossHook

    left = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert [type(h) for h in left] == [LossHook]  # only the penalty's permanent hook on the wrapped model
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_adapter_names_must_name_every_sample(tmp_path, images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig()).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"same as the number of inputs, but got 3 and 4 respectively"):
            model(images, adapter_names=["default"] * 3)
        with pytest.raises(ValueError, match=r"same as the number of inputs, but got 5 and 4 respectively"):
            model(images, adapter_names=["default"] * 5)
        with pytest.raises(TypeError, match=r"adapter_names='default' is invalid: pass a list with one adapter name"):
            model(images, adapter_names="default")
        out = model(images, adapter_names=["default", "__base__", "default", "__base__"])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("call_train", [True, False, "base", "apply"])
def test_frozen_norms_keep_the_base_batchnorm_statistics(images, call_train):
    """With train_norms=False the base's BatchNorm statistics never move, however train mode was set (issue 24: also
    ``get_base_model().train()`` and ``model.apply(lambda m: m.train())``, which bypass the model's ``train``)."""
    model = get_peft_model(tiny_resnet(), TAPSConfig(train_norms=False))  # timm models start in train mode
    stats = {k: v.clone() for k, v in model.get_base_model().state_dict().items()
             if "running" in k or "num_batches" in k}
    assert stats
    opt = optimizer_for(model, torch.optim.SGD, lr=0.1)
    if call_train == "base":
        model.get_base_model().train()
    elif call_train == "apply":
        model.apply(lambda m: m.train())
    elif call_train:
        model.train()
    for step in range(2):
        (logits(model, images).square().mean() + model.taps_penalty()).backward()
        opt.step()
        opt.zero_grad()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert model.training  # the rest of the model is in training mode


def test_frozen_norms_are_plain_again_after_unload_and_in_trainable_copies(images):
    """The frozen base BatchNorm layers keep eval mode by themselves; what ``unload`` returns trains as before, a
    deep copy or pickle of the model keeps the rule, and a trainable copy (a second adapter with train_norms=True)
    trains its statistics."""
    import pickle

    model = get_peft_model(tiny_resnet(), TAPSConfig(train_norms=False))
    model.add_adapter("normed", TAPSConfig())
    bn = model.base_model.model.bn1
    model.set_adapter("normed")
    model.train()
    assert bn.modules_to_save["normed"].training and not bn.original_module.training
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.get_base_model().train()
        assert not clone.base_model.model.bn1.original_module.training
        assert clone.base_model.model.bn1.modules_to_save["normed"].training
    plain = get_peft_model(tiny_resnet(), TAPSConfig(train_norms=False)).unload()
    plain.train()
    assert all(m.training for m in plain.modules())
    assert not any("train" in vars(m) for m in plain.modules())


def test_delete_adapter_then_forward_of_a_task_model():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    model = get_peft_model(bert, TAPSConfig(task_type="FEATURE_EXTRACTION"), adapter_name="a")
    model.add_adapter("b", TAPSConfig(task_type="FEATURE_EXTRACTION"))
    model.delete_adapter("a")
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert model(input_ids=ids).last_hidden_state.shape == (2, 5, 16)


def test_sequence_classification_task_type_is_accepted():
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    model = get_peft_model(bert, TAPSConfig(task_type="SEQ_CLS"))
    assert model.base_model.model.classifier.modules_to_save["default"].weight.requires_grad
    out = model(input_ids=torch.randint(0, 50, (2, 5)), labels=torch.tensor([0, 2]))
    out.loss.backward()


def test_config_from_pretrained_needs_only_the_config_and_can_be_reused(tmp_path):
    """A config read from a saved adapter is bound to that folder: injecting it checks that PEFT could read the
    folder's weights (missing weights are refused; the load checks the rest); ``dataclasses.replace`` gives an unbound
    copy. A config saved on its own binds to nothing. One config object serves several architectures: it is never
    rewritten."""
    import dataclasses

    get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.3)).save_pretrained(tmp_path / "full")
    (tmp_path / "full" / "adapter_model.safetensors").unlink()
    config = TAPSConfig.from_pretrained(tmp_path / "full")
    assert config.lam == 0.3 and isinstance(PeftConfig.from_pretrained(tmp_path / "full"), TAPSConfig)
    with pytest.raises(FileNotFoundError, match=r"No adapter_model\.safetensors in .*weights are missing"):
        get_peft_model(tiny_timm_vit(num_classes=7), config)
    settings = dataclasses.replace(config)
    vit = get_peft_model(tiny_timm_vit(num_classes=7), settings)  # another head size
    assert vit.base_model.model.head.modules_to_save["default"].out_features == 7
    mine = TAPSConfig(lam=0.3)
    get_peft_model(tiny_timm_vit(), mine)
    resnet = get_peft_model(tiny_resnet(), mine)  # and another architecture, from the same object
    assert resnet.peft_config["default"].modules_to_save[0] == "fc"
    assert mine.modules_to_save is None and mine.target_modules is None and mine.base_model_info is None
    TAPSConfig(lam=0.4).save_pretrained(tmp_path / "alone")
    get_peft_model(tiny_timm_vit(), TAPSConfig.from_pretrained(tmp_path / "alone"))


def test_scores_stay_fp32_and_deltas_follow_the_base_dtype():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(score_init=0.1))  # a score exactly at tau
    model.half()
    layer = taps_layers(model)[0]
    tau = torch.tensor(0.1).item()  # 0.1 in fp32
    assert layer.taps_scores["default"].dtype == torch.float32 and layer.taps_scores["default"].item() == tau
    assert layer.is_active("default")  # fp16 would have rounded 0.1 to 0.0999755859375 and closed the gate
    assert layer.taps_delta["default"].dtype == torch.float16  # model.half() converts every tensor, as for LoRA
    model.to(torch.bfloat16)
    assert layer.taps_scores["default"].item() == tau and layer.taps_delta["default"].dtype == torch.bfloat16
    model.merge_adapter()
    model.float()  # the base weight set aside while merged converts too
    model.unmerge_adapter()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model(torch.randn(1, 3, 32, 32))
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):  # PEFT's policy, both ways
        bf16 = get_peft_model(tiny_timm_vit().to(torch.bfloat16), TAPSConfig(), autocast_adapter_dtype=autocast)
        layer = taps_layers(bf16)[0]
        assert layer.taps_delta["default"].dtype == dtype and layer.taps_scores["default"].dtype == torch.float32
        assert layer.taps_delta["default"].requires_grad and layer.taps_scores["default"].requires_grad


def test_hooks_on_a_base_layer_are_honoured():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    net[0].register_forward_pre_hook(lambda mod, args: seen.append(("pre", mod.weight.sum().item())))
    net[0].register_forward_hook(lambda mod, args, out: out * 2)
    x = torch.randn(3, 4)
    expected = net(x)
    model = get_peft_model(net, TAPSConfig(target_modules=["0", "2"], init_weights=False))
    model.eval()
    with torch.no_grad():
        got = model(x)
        w = net[0].base_layer.weight + net[0].taps_delta["default"]
        want = net[2](torch.relu(F.linear(x, w, net[0].base_layer.bias) * 2))
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, expected)
    assert seen[-1][1] == pytest.approx(w.sum().item(), abs=1e-5)  # the hook saw the gated weight


def test_quantized_and_offloaded_layers_are_refused_clearly():
    class Int8Linear(nn.Linear):  # the shape of bitsandbytes' Linear8bitLt: an nn.Linear with an int8 weight
        def __init__(self, n_in, n_out):
            super().__init__(n_in, n_out)
            self.weight = nn.Parameter(torch.zeros(n_out, n_in, dtype=torch.int8), requires_grad=False)

    net = nn.Sequential(Int8Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"cannot gate `0` \(Int8Linear\).*dtype torch.int8.*unquantized"):
        get_peft_model(net, TAPSConfig(target_modules=["0", "1"]))
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    add_hook_to_module(net[0], AlignDevicesHook(io_same_device=True))
    with pytest.raises(TypeError, match=r"cannot gate `0` \(Linear\): Accelerate hooks it"):
        get_peft_model(net, TAPSConfig(target_modules=["0", "1"]))
    assert type(net[0]) is nn.Linear  # refused before anything was replaced
