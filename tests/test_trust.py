"""Adapters that say truthfully what they hold and need (issue 14): base identity and the card's rebuild code,
strict all-or-nothing loading, folder-atomic saves, file modes, adapter names, a NaN stop in the Trainer."""

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

from taps_peft import TAPSConfig, TAPSLayer
from taps_peft.hub.identity import BaseModelMismatchWarning, adapter_layers, fingerprint
from conftest import logits, tiny_hf_vit, tiny_timm_vit

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


def resnet(num_classes=7, seed=3):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def snapshot(model):
    """Tensors, the very module objects, and requires_grad flags."""
    return {k: v.clone() for k, v in model.state_dict().items()}, [id(m) for m in model.modules()], [
        p.requires_grad for p in model.parameters()]


def unchanged(before, model):
    tensors, modules, grads = snapshot(model)
    return (before[1] == modules and before[2] == grads and before[0].keys() == tensors.keys()
            and all(torch.equal(v, tensors[k]) for k, v in before[0].items()))


def card_code(folder: Path) -> str:
    """The Python block of the card's "How to load" section, without the PeftModel line."""
    block = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[1]
    return "\n".join(line for line in block.splitlines() if "PeftModel" not in line)


# ----- base identity -----


def test_the_card_rebuilds_a_random_init_base_from_its_seed(tmp_path):
    info = {"pretrained": False, "seed": 3}
    model = get_peft_model(resnet(), TAPSConfig(base_model_info=info, init_weights=False))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_info"]
    assert saved["name"] == "resnet10t" and saved["num_classes"] == 7 and saved["pretrained"] is False
    code = card_code(tmp_path)
    assert "torch.manual_seed(3)" in code and 'timm.create_model("resnet10t", pretrained=False, num_classes=7)' in code
    scope = {}
    exec(code, scope)  # the card's own code, as a user would paste it
    rebuilt = scope["base"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        loaded = PeftModel.from_pretrained(rebuilt, tmp_path)
    assert fingerprint(loaded, adapter_layers(loaded, "default")) == saved["fingerprint"]
    assert "| Classes | 7 |" in (tmp_path / "README.md").read_text()


def test_the_card_never_claims_weights_it_does_not_know_of(tmp_path):
    get_peft_model(resnet(), TAPSConfig()).save_pretrained(tmp_path / "unknown")
    code = card_code(tmp_path / "unknown")
    assert "pretrained=True" not in code and "does not record which" in code and "num_classes=7" in code
    pretrained = TAPSConfig(base_model_info={"name": "timm/resnet10t.c3_in1k", "pretrained": True})
    get_peft_model(resnet(), pretrained).save_pretrained(tmp_path / "named")
    assert 'timm.create_model("hf-hub:timm/resnet10t.c3_in1k", pretrained=True, num_classes=7)' in card_code(
        tmp_path / "named")
    assert "base_model: timm/resnet10t.c3_in1k" in (tmp_path / "named" / "README.md").read_text()


def test_a_base_with_other_weights_warns_naming_both_or_raises_when_strict(tmp_path, images):
    get_peft_model(resnet(seed=3), TAPSConfig(init_weights=False)).save_pretrained(tmp_path)
    with pytest.warns(BaseModelMismatchWarning, match=r"trained on the base `resnet10t`.*also `resnet10t` but has"):
        PeftModel.from_pretrained(resnet(seed=4), tmp_path)
    other = resnet(seed=4)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"same layer shapes but other weights"):
        PeftModel.from_pretrained(other, tmp_path, strict_base=True)
    assert unchanged(before, other)  # the failed load put the base back
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(resnet(seed=3).to(torch.bfloat16), tmp_path)  # the same base in bf16 matches


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


def test_the_fingerprint_covers_the_adapter_s_own_layers(tmp_path):
    """An adapter on some layers, saved or loaded beside one on all layers (or into a merged model): no false alarm."""
    base = resnet()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False), adapter_name="all")
    model.add_adapter("few", TAPSConfig(target_modules=["layer1.0.conv1", "layer2.0.conv1"], init_weights=False))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        alone = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "few", adapter_name="few")
        alone.load_adapter(tmp_path / "all", adapter_name="all")
        merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "all", adapter_name="all")
        merged.merge_adapter()
        merged.load_adapter(tmp_path / "few", adapter_name="few")
    with pytest.warns(BaseModelMismatchWarning):
        PeftModel.from_pretrained(resnet(seed=5), tmp_path / "few")


def test_a_failed_load_into_a_model_you_built_strips_nothing(tmp_path, images):
    """Only a failed PeftModel.from_pretrained undoes its own injection; a model built with get_peft_model (even from
    the same saved config) keeps its layers when a later load_adapter fails."""
    get_peft_model(tiny_timm_vit(), TAPSConfig(init_weights=False)).save_pretrained(tmp_path / "good")
    model = get_peft_model(tiny_timm_vit(), TAPSConfig.from_pretrained(tmp_path / "good"))
    before = snapshot(model)
    bad = _edited(tmp_path / "good", tmp_path / "bad", lambda t, c: t.update(
        {k: torch.full_like(v, float("nan")) for k, v in t.items() if k.endswith("taps_delta")}))
    with pytest.raises(ValueError, match="NaN"):
        model.load_adapter(bad, adapter_name="default")
    assert unchanged(before, model) and sum(isinstance(m, TAPSLayer) for m in model.modules()) == 8


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


# ----- strict, all-or-nothing loading -----


def _edited(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    config = json.loads((dst / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / WEIGHTS)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("fault, message", [
    ("pos_embed", r"belong to no layer or module the adapter declares \(e\.g\. `pos_embed`\)"),
    ("base_weight", r"belong to no layer or module .*`blocks\.0\.attn\.qkv\.weight`"),
    ("head_undeclared", r"belong to no layer or module .*`head\.(bias|weight)`"),
    ("active_without_delta", r"is incomplete: the layer `.*blocks\.1\.mlp\.fc1` is active"),
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


# ----- saving -----

_SAVER = textwrap.dedent("""
    import sys, torch, timm, taps_peft
    from peft import get_peft_model
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    model = get_peft_model(base, taps_peft.TAPSConfig())
    first = next(m for m in model.modules() if isinstance(m, taps_peft.TAPSLayer))
    for i in range(10**6):
        model.peft_config["default"].lam = float(i)
        with torch.no_grad():
            first.taps_scores["default"].fill_(1000.0 + i)  # the save's number, in the weights too
        model.save_pretrained(sys.argv[1])
        print(i, flush=True)
""")


def _consistent(folder: Path) -> bool:
    lam = json.loads((folder / "adapter_config.json").read_text())["lam"]
    score = load_file(folder / WEIGHTS)["base_model.model.blocks.0.attn.qkv.taps_scores"]
    return float(score) == 1000.0 + lam and f"| lam (sparsity weight) | {lam} |" in (folder / "README.md").read_text()


def test_a_save_killed_at_any_moment_leaves_a_whole_folder(tmp_path):
    target = tmp_path / "adapter"
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
        assert proc.stdout.readline().strip() == "0"  # one whole save done
        time.sleep(0.05 + 0.11 * kill)  # then somewhere in the middle of a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _consistent(target), f"kill {kill}: config, weights and card come from different saves"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "adapter"]
    assert leftovers  # a kill did land in the middle of a save (its temporary folder is left)
    get_peft_model(tiny_timm_vit(), TAPSConfig()).save_pretrained(target)  # the next save cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], leftovers


def test_saved_files_follow_the_umask_and_the_folder_keeps_its_own(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "link.txt").symlink_to("notes.txt")
    folder.chmod(0o2750)  # private, setgid: a save must not open it up
    old = os.umask(0o027)
    try:
        model.save_pretrained(folder)
    finally:
        os.umask(old)
    modes = {p.name: p.lstat().st_mode & 0o777 for p in folder.iterdir() if not p.is_symlink()}
    assert modes == {"adapter_config.json": 0o640, WEIGHTS: 0o640, "README.md": 0o640, "notes.txt": modes["notes.txt"]}
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "link.txt").is_symlink()
    assert folder.stat().st_mode & 0o7777 == 0o2750


def test_saving_onto_a_file_or_under_a_read_only_parent(tmp_path, monkeypatch):
    import taps_peft.hub.atomic as atomic

    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"it is a file, not a folder"):
        model.save_pretrained(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)  # e.g. /kaggle/working: no new siblings
    model.save_pretrained(tmp_path / "mounted")
    assert sorted(p.name for p in (tmp_path / "mounted").iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mounted"]


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


# ----- the Trainer stops on a non-finite loss -----


def test_taps_trainer_stops_on_a_nan_loss_and_saves_no_nan_checkpoint(tmp_path):
    from transformers import TrainingArguments

    from taps_peft.training import TAPSTrainer

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"pixel_values": torch.full((3, 32, 32), float("nan") if i >= 8 else 0.1), "labels": i % 5}

    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit(), TAPSConfig())
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = TAPSTrainer(model=model, args=args, train_dataset=Data())
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(16))  # clean batches first
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 3 .*no checkpoint of it was saved"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for ckpt in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / WEIGHTS).values())


def test_a_broken_adapter_config_names_the_file(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    model.save_pretrained(tmp_path / "good")
    (tmp_path / "good" / "adapter_config.json").write_text('{"peft_type": "TAPS", ')  # cut short
    with pytest.raises(ValueError, match=r"adapter config '.*good/adapter_config\.json' is not valid JSON"):
        TAPSConfig.from_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match=r"good/adapter_config\.json' is not valid JSON"):
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


def test_export_lora_loads_without_taps_peft_and_matches(tmp_path):
    from taps_peft import export_lora

    model = get_peft_model(resnet(), TAPSConfig(init_weights=False)).eval()
    layers = [m for m in model.modules() if isinstance(m, TAPSLayer)]
    with torch.no_grad():
        for layer in layers[::3]:
            layer.taps_scores["default"].fill_(0.0)  # closed: not exported
        x = torch.randn(2, 3, 64, 64)
        expected = model(x)
    info = export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    active = {n for n, m in model.base_model.taps_layers() if m.is_active("default")}
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == active == set(info["lora_layers"])
    assert {k.replace("\\", "") for k in config["rank_pattern"]} == active and config["rank_pattern"] == config[
        "alpha_pattern"]  # one rank per layer, every scaling 1
    assert "fc" in config["modules_to_save"] and "bn1" in config["modules_to_save"]
    save_file({"x": x}, tmp_path / "x.safetensors")
    subprocess.run([sys.executable, "-c", _LOAD_LORA, str(tmp_path / "lora"), str(tmp_path / "x.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, cwd=ROOT, timeout=300)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], expected, rtol=0, atol=1e-5)
    small = export_lora(model, tmp_path / "r4", rank=4)
    assert max(small["lora_layers"].values()) == 4 and small["bytes"] < info["bytes"]


def test_export_lora_saves_layers_lora_cannot_hold_whole(tmp_path):
    from torch import nn

    from taps_peft import export_lora

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    pristine = copy.deepcopy(net)
    model = get_peft_model(net, TAPSConfig(target_modules=["0", "1", "3"], init_weights=False)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    info = export_lora(model, tmp_path)
    assert info["saved_whole"] == ["1"] and set(info["lora_layers"]) == {"0", "3"}  # the depthwise conv is whole
    loaded = PeftModel.from_pretrained(pristine, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
