"""Reliability: bad input, faults and round trips (docs/guarantees.md lists what each test proves).

- bad config values and bad targets raise errors naming the field, the value and the fix (property-based too);
- a broken or foreign adapter (truncated, corrupted, missing, pickled, NaN/inf, another method, another base) is
  refused with a clear error before anything is injected: the model and its other adapters stay exactly as they were;
- training stops on a NaN loss naming the step; a save killed mid-way leaves the previous checkpoint, and resuming
  from it gives the uninterrupted result;
- bf16 save/load and merge/unmerge are exact; adapters are written and read as safetensors only, nothing unpickled.
"""

import ast
import copy
import json
import math
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

import taps_peft
from taps_peft import TAPSConfig, TAPSLayer, TAPSModel
from conftest import MODELS, logits, optimizer_for, tiny_timm_vit

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

PACKAGE = Path(taps_peft.__file__).resolve().parent
WEIGHTS = "adapter_model.safetensors"



def taps_layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


def trained(base, images, adapter="default", steps=2, closed=(0,)):
    """A TAPS model after a few AdamW steps (deltas, scores, norms, head all move), some gates closed, in eval."""
    model = get_peft_model(base, TAPSConfig(lam=0.1), adapter_name=adapter)
    opt = optimizer_for(model, torch.optim.AdamW, lr=1e-2, score_lr=1e-3)
    target = torch.arange(len(images)) % 5
    for step in range(steps):
        loss = F.cross_entropy(logits(model, images).float(), target) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i in closed:
            taps_layers(model)[i].taps_scores[adapter].fill_(0.0)
    return model.eval()


def snapshot(model):
    """Everything a failed load must leave alone: adapters, layers, wrappers, every tensor, module types."""
    return {
        "configs": list(model.peft_config) if hasattr(model, "peft_config") else None,
        "active": list(model.active_adapters) if hasattr(model, "peft_config") else None,
        "layers": {n: sorted(m.taps_delta) for n, m in model.named_modules() if isinstance(m, TAPSLayer)},
        "wrappers": {
            n: sorted(m.modules_to_save) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
        },
        "types": [type(m).__name__ for m in model.modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(before, after):
    assert {k: v for k, v in before.items() if k != "tensors"} == {k: v for k, v in after.items() if k != "tensors"}
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key


# ----- bad config values: the field, the value and the fix -----

BAD_MESSAGE = re.compile(r"TAPSConfig\.(\w+)=.* is invalid.*: use ", re.S)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lam": float("inf")}, "lam"), ({"lam": True}, "lam"), ({"lam": "0.5"}, "lam"), ({"lam": 10**400}, "lam"),
        ({"tau": -0.1}, "tau"), ({"tau": float("nan")}, "tau"), ({"tau": None}, "tau"),
        ({"score_init": float("-inf")}, "score_init"), ({"tau": 0.5, "score_init": 0.15}, "score_init"),
        ({"lam_warmup": 1.0}, "lam_warmup"), ({"lam_warmup": True}, "lam_warmup"), ({"score_lr": 0}, "score_lr"),
        ({"total_step": 1.5}, "total_step"), ({"total_step": 0}, "total_step"),
        ({"target_modules": []}, "target_modules"), ({"target_modules": ""}, "target_modules"),
        ({"target_modules": "(qkv"}, "target_modules"), ({"target_modules": [3]}, "target_modules"),
        ({"target_modules": 5}, "target_modules"), ({"exclude_modules": [None]}, "exclude_modules"),
        ({"modules_to_save": "head"}, "modules_to_save"), ({"modules_to_save": [""]}, "modules_to_save"),
        ({"train_norms": "no"}, "train_norms"), ({"init_weights": 0}, "init_weights"),
        ({"save_inactive_deltas": None}, "save_inactive_deltas"),
    ],
)
def test_bad_config_values_name_field_value_and_fix(kwargs, field):
    with pytest.raises(ValueError, match=BAD_MESSAGE) as info:
        TAPSConfig(**kwargs)
    assert BAD_MESSAGE.search(str(info.value)).group(1) == field
    assert repr(kwargs[field])[:20] in str(info.value)


@pytest.mark.parametrize(
    "field, value",
    [("r", 0), ("r", 2.5), ("alpha", float("nan")), ("alpha", -1.0), ("lam", float("nan")), ("lam", -0.5),
     ("tau", float("inf")), ("tau", 0.5), ("score_init", 0.01), ("score_lr", 0), ("lam_warmup", 1.0),
     ("total_step", 0), ("budget_layers", 0), ("budget_mib", float("nan")), ("budget_rate", -1.0), ("r", None)],
)
def test_numeric_fields_set_after_construction_are_checked(field, value):
    """Issue 24: ``config.r = 0`` or ``config.lam = nan`` after construction get the constructor's ValueError (field,
    value, fix), and the config keeps its old value."""
    config = TAPSConfig(r=4, alpha=8.0)
    before = config.to_dict()
    with pytest.raises(ValueError, match=BAD_MESSAGE) as info:
        setattr(config, field, value)
    assert BAD_MESSAGE.search(str(info.value)).group(1) == field and repr(value) in str(info.value)
    assert config.to_dict() == before


def test_valid_values_set_after_construction_are_normalised_and_peft_attributes_pass():
    np = pytest.importorskip("numpy")
    config = TAPSConfig()
    config.lam, config.r, config.total_step = np.float32(0.25), np.int64(8), 10
    config.alpha = 16
    assert (type(config.lam), type(config.r), type(config.alpha)) == (float, int, float)
    config.score_init, config.tau = 0.5, 0.4  # score_init first, then a tau up to it
    config.alpha, config.r = None, None  # alpha first, then back to full-size deltas
    config.inference_mode, config.base_model_name_or_path, config.revision = True, "x", "main"
    assert (config.tau, config.r, config.inference_mode) == (0.4, None, True)
    assert PeftConfig.from_peft_type(**config.to_dict()).to_dict() == config.to_dict()  # as PEFT builds configs


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    config = TAPSConfig(lam=np.float32(0.25), tau=np.float64(0.05), score_init=1, total_step=np.int64(3),
                        target_modules=("qkv", "fc1"))
    assert type(config.lam) is float and type(config.score_init) is float and type(config.total_step) is int
    assert config.target_modules == {"qkv", "fc1"}
    config.save_pretrained(tmp_path)  # JSON-serialisable
    assert json.loads((tmp_path / "adapter_config.json").read_text())["total_step"] == 3


if given is not None:
    NUMBERS = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 1), st.integers(-(10**30), 10**30),
        st.booleans(), st.none(), st.text(max_size=4), st.just(10**400), st.lists(st.floats(0, 1), max_size=2),
    )
    NAMES = st.one_of(
        st.none(), st.text(max_size=6), st.integers(), st.lists(st.one_of(st.text(max_size=6), st.integers()),
                                                               max_size=3),
        st.sets(st.sampled_from(["qkv", "fc1", "head", "("]), max_size=3), st.dictionaries(st.text(max_size=2),
                                                                                           st.integers(), max_size=1),
    )
    FIELDS = ("lam", "tau", "score_init", "total_step", "lam_warmup")

    def _names_a_drawn_field(err, kwargs):
        """The error names a field that was drawn (score_init is also wrong when only tau was drawn: it must be >=
        tau, and the message says so)."""
        match = BAD_MESSAGE.search(str(err))
        assert match, str(err)
        field = match.group(1)
        assert field in kwargs or (field == "score_init" and f"tau ({float(kwargs['tau'])})" in str(err)), str(err)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.fixed_dictionaries({}, optional={f: NUMBERS for f in FIELDS}))
    def test_property_numeric_fields_valid_or_value_error_naming_the_field(kwargs):
        try:
            config = TAPSConfig(**kwargs)
        except ValueError as err:  # any other exception type fails the test
            _names_a_drawn_field(err, kwargs)
            return
        for name in ("lam", "tau", "score_init"):
            assert type(getattr(config, name)) is float and math.isfinite(getattr(config, name))
        assert config.lam >= 0 and config.tau > 0 and config.score_init >= config.tau
        assert config.total_step is None or (type(config.total_step) is int and config.total_step >= 1)
        assert type(config.lam_warmup) is float and 0 <= config.lam_warmup < 1

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.fixed_dictionaries({}, optional={f: NAMES for f in ("target_modules", "exclude_modules",
                                                                    "modules_to_save")}))
    def test_property_module_fields_valid_or_value_error_naming_the_field(kwargs):
        try:
            config = TAPSConfig(**kwargs)
        except ValueError as err:
            _names_a_drawn_field(err, kwargs)
            return
        for name in ("target_modules", "exclude_modules"):
            value = getattr(config, name)
            assert value is None or isinstance(value, str) or all(isinstance(v, str) and v for v in value)
        assert config.target_modules is None or len(config.target_modules) > 0
        assert config.modules_to_save is None or all(isinstance(v, str) and v for v in config.modules_to_save)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(FIELDS + ("score_lr", "r", "alpha", "budget_layers", "budget_mib", "budget_rate")), NUMBERS)
    def test_property_numeric_fields_set_later_valid_or_value_error_naming_the_field(name, value):
        """Setting a field after construction leaves a config that __post_init__ would accept, or raises a
        ValueError naming that field and leaves the config as it was."""
        config = TAPSConfig(r=4, alpha=8.0)
        before = config.to_dict()
        try:
            setattr(config, name, value)
        except ValueError as err:
            match = BAD_MESSAGE.search(str(err))
            assert match and match.group(1) == name, str(err)
            assert config.to_dict() == before
            return
        assert PeftConfig.from_peft_type(**config.to_dict()).to_dict() == config.to_dict()  # __post_init__ agrees

    POOL = ["qkv", "proj", "fc1", "fc2", "head", "norm1", "blocks.0.attn", "patch_embed.proj", "nope", r"blocks\.1\..*"]

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        target=st.one_of(st.none(), st.lists(st.sampled_from(POOL[:-1]), min_size=1, max_size=3),
                         st.sampled_from([r".*\.(qkv|fc1)", r"blocks\.1\..*", r".*norm1"])),
        exclude=st.one_of(st.none(), st.lists(st.sampled_from(POOL), max_size=4)),
        save=st.one_of(st.none(), st.lists(st.sampled_from(["head", "norm", "blocks.0.norm1", "nope", "fc_norm"]),
                                           max_size=2)),
        train_norms=st.booleans(),
    )
    def test_property_get_peft_model_builds_or_fails_cleanly(vit_base, target, exclude, save, train_norms):
        """Any mix of targets/exclusions/saved modules either builds a model or raises an error that names the
        TAPSConfig field, before any module is replaced (the base model is left as it was)."""
        base = copy.deepcopy(vit_base)
        before = snapshot(base)
        config = TAPSConfig(target_modules=target, exclude_modules=exclude, modules_to_save=save,
                            train_norms=train_norms)
        try:
            model = get_peft_model(base, config)
        except (ValueError, TypeError) as err:
            assert str(err).startswith("TAPSConfig."), str(err)
            assert_unchanged(before, snapshot(base))
            return
        assert taps_layers(model)

else:  # pragma: no cover

    def test_property_tests_need_hypothesis():
        pytest.skip("hypothesis is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def vit_base():
    torch.manual_seed(0)
    return tiny_timm_vit()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"modules_to_save": ["nope"]}, ValueError,
         r"TAPSConfig\.modules_to_save: \['nope'\] matched no module.*modules_to_save=None for the detected "
         r"classifier head \('head'\)"),
        ({"modules_to_save": ["head", "attn.norm"]}, ValueError,
         r"\['attn\.norm'\] matched no module with parameters"),
        ({"exclude_modules": ["qkv", "proj", "fc1", "fc2"]}, ValueError,
         r"TAPSConfig\.target_modules=None \(the default layers\) is invalid for VisionTransformer: it leaves no "
         r"layer to gate.*excluded by exclude_modules"),
        ({"exclude_modules": ".*"}, ValueError, r"leaves no layer to gate"),
        ({"target_modules": ["head"]}, ValueError, r"TAPSConfig\.target_modules=\{'head'\} is invalid.*no layer to "
                                                    r"gate.*modules_to_save=\['head'"),
        ({"target_modules": ["norm1"]}, ValueError,
         r"leaves no layer to gate.*\['blocks\.0\.norm1', 'blocks\.1\.norm1'\]"),
        ({"target_modules": ["qkv", "blocks.1.norm1"], "train_norms": False}, TypeError,
         r"TAPSConfig\.target_modules: TAPS cannot gate `blocks\.1\.norm1` \(LayerNorm\).*Remove it from"),
        ({"target_modules": ["blocks.0.attn"]}, TypeError, r"cannot gate `blocks\.0\.attn` \(Attention\)"),
        ({"target_modules": ["does_not_exist"]}, ValueError, r"TAPSConfig\.target_modules: \['does_not_exist'\]"),
    ],
)
def test_bad_targets_fail_before_any_module_is_replaced(vit_base, kwargs, error, message):
    base = copy.deepcopy(vit_base)
    before = snapshot(base)
    with pytest.raises(error, match=re.compile(message, re.S)):
        get_peft_model(base, TAPSConfig(**kwargs))
    assert_unchanged(before, snapshot(base))  # e.g. blocks.0.attn.qkv was not wrapped before blocks.1.norm1 failed


def test_second_adapter_with_bad_targets_leaves_the_first_alone(vit_base, images):
    model = trained(copy.deepcopy(vit_base), images, adapter="one")
    before, out = snapshot(model), logits(model, images)
    with pytest.raises(TypeError, match="blocks.1.norm1"):
        model.add_adapter("two", TAPSConfig(target_modules=["qkv", "blocks.1.norm1"], train_norms=False))
    assert_unchanged(before, snapshot(model))
    assert torch.equal(logits(model, images), out)


# ----- loading faults: a clear error, and nothing changed -----


def _rebind(d):
    """Bind the config to the (edited) weights, as if one save had written both: the load's structural checks run."""
    from taps_peft.trust.load import tensors_digest

    config = json.loads((d / "adapter_config.json").read_text())
    config["weights_digest"] = tensors_digest(load_file(d / WEIGHTS).values())
    (d / "adapter_config.json").write_text(json.dumps(config))


def _corrupt(tensor_name_part, value):
    def edit(d):
        sd = load_file(d / WEIGHTS)
        key = next(k for k in sorted(sd) if tensor_name_part in k)
        sd[key].view(-1)[0] = value
        save_file(sd, d / WEIGHTS)
        _rebind(d)
    return edit


def _drop_key(part):
    def edit(d):
        sd = load_file(d / WEIGHTS)
        del sd[next(k for k in sorted(sd) if part in k)]
        save_file(sd, d / WEIGHTS)
        _rebind(d)
    return edit


def _to_pickle(d):
    torch.save(load_file(d / WEIGHTS), d / "adapter_model.bin")
    (d / WEIGHTS).unlink()


def _say_lora(d):
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))


FAULTS = {  # name: (how the good adapter folder is damaged, expected error, message)
    "truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-64]), ValueError,
                  r"is not a valid safetensors file \(.*incomplete metadata.*\): it is truncated or corrupted"),
    "corrupted_header": (lambda d: (d / WEIGHTS).write_bytes(b"\xff" * 16 + (d / WEIGHTS).read_bytes()[16:]),
                         ValueError, r"not a valid safetensors file.*truncated or corrupted"),
    "empty_file": (lambda d: (d / WEIGHTS).write_bytes(b""), ValueError, r"not a valid safetensors file"),
    "missing_weights": (lambda d: (d / WEIGHTS).unlink(), FileNotFoundError,
                        r"No adapter_model\.safetensors in .*the adapter's weights are missing"),
    "missing_folder": (lambda d: shutil.rmtree(d), ValueError, r"Can't find 'adapter_config\.json'"),
    "nan_delta": (_corrupt(".taps_delta", float("nan")), ValueError, r"holds 1 NaN/inf value\(s\) in `.*taps_delta`"),
    "inf_score": (_corrupt(".taps_scores", float("inf")), ValueError, r"NaN/inf value\(s\) in `.*taps_scores`"),
    "inf_head": (_corrupt(".head.weight", float("-inf")), ValueError, r"NaN/inf value\(s\) in `.*head\.weight`"),
    "nan_norm": (_corrupt(".norm.bias", float("nan")), ValueError, r"NaN/inf value\(s\) in `.*norm"),
    "pickle_only": (_to_pickle, ValueError, r"TAPS adapters are loaded from safetensors only.*never unpickles"),
    "missing_score": (_drop_key("blocks.1.attn.qkv.taps_scores"), ValueError,
                      r"does not fit this base model.*no score for the layer `blocks\.1\.attn\.qkv`"),
    "missing_head": (_drop_key("head.weight"), ValueError, r"does not fit this base model.*no `head\.weight`"),
    "lora_weights_taps_config": ("lora_weights", ValueError, r"mixes two saves: its adapter_config\.json and its "
                                 r"adapter_model\.safetensors were written by different save_pretrained calls"),
    "other_width": ("wide", ValueError, r"does not fit this base model.*delta for `blocks\.0\.attn\.proj` has shape"),
    "other_num_classes": ("classes7", ValueError, r"does not fit.*`head\.weight` has shape \(7, 192\) in the file"),
    "other_depth": ("deep", ValueError, r"(?=.*does not fit this base model)(?=.*`?blocks\.2\.attn\.proj)"),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A good TAPS adapter for the tiny ViT, adapters of other bases and methods, and one damaged copy per fault."""
    timm = pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    base = tiny_timm_vit()
    images = torch.randn(4, 3, 32, 32)
    trained(copy.deepcopy(base), images).save_pretrained(root / "good")
    trained(copy.deepcopy(base), images).save_pretrained(root / "good2")
    trained(tiny_timm_vit(num_classes=7), images).save_pretrained(root / "classes7")
    trained(tiny_timm_vit(depth=3), images).save_pretrained(root / "deep")
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=96, num_heads=3)
    trained(wide, images).save_pretrained(root / "wide")
    get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["qkv"])).save_pretrained(root / "lora")
    for name, (damage, _, _) in FAULTS.items():
        if isinstance(damage, str):
            if damage == "lora_weights":
                shutil.copytree(root / "good", root / name)
                shutil.copy(root / "lora" / WEIGHTS, root / name / WEIGHTS)
            continue
        shutil.copytree(root / "good", root / name)
        damage(root / name)
    return root, base, images


def _source(root, fault):
    damage = FAULTS[fault][0]
    return root / (damage if isinstance(damage, str) and damage != "lora_weights" else fault)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled while loading an adapter")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_load_adapter_is_clear_and_changes_nothing(adapters, fault, no_unpickling):
    root, base, images = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "good", adapter_name="one").eval()
    model.load_adapter(root / "good2", adapter_name="two")
    outputs = {}
    with torch.no_grad():
        for name in ("two", "one"):  # ends with "one" active
            model.set_adapter(name)
            outputs[name] = logits(model, images)
    before = snapshot(model)
    _, error, message = FAULTS[fault]
    with pytest.raises(error, match=re.compile(message, re.S)):
        model.load_adapter(_source(root, fault), adapter_name="new")
    assert "new" not in model.peft_config and all("new" not in m.taps_delta for m in taps_layers(model))
    assert_unchanged(before, snapshot(model))
    with torch.no_grad():
        for name, expected in outputs.items():
            model.set_adapter(name)
            assert torch.equal(logits(model, images), expected), name


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_from_pretrained_is_clear_and_leaves_the_base_alone(adapters, fault, no_unpickling):
    root, base, images = adapters
    fresh = copy.deepcopy(base).eval()
    with torch.no_grad():
        expected = logits(fresh, images)
    before = snapshot(fresh)
    _, error, message = FAULTS[fault]
    with pytest.raises(error, match=re.compile(message, re.S)):
        PeftModel.from_pretrained(fresh, _source(root, fault))
    assert_unchanged(before, snapshot(fresh))  # no TAPS layer or wrapper was injected into the user's model
    with torch.no_grad():
        assert torch.equal(logits(fresh, images), expected)


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")  # PEFT reading TAPS fields as LoRA
def test_adapter_of_another_method(adapters):
    """A LoRA adapter (or a folder whose adapter_config.json says LORA) is refused by PEFT before it adds anything;
    asking TAPSConfig for it names the method."""
    root, base, images = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "good").eval()
    before = snapshot(model)
    for source in (root / "lora", _say_lora_copy(root)):
        with pytest.raises(ValueError, match=r"different peft types\. Found PeftType\.TAPS and PeftType\.LORA"):
            model.load_adapter(source, adapter_name="other")
        assert_unchanged(before, snapshot(model))
    with pytest.raises(ValueError, match=r"is a LORA adapter, not TAPS .*peft_type='LORA'"):
        TAPSConfig.from_pretrained(root / "lora")


def _say_lora_copy(root):
    target = root / "says_lora"
    if not target.exists():
        shutil.copytree(root / "good", target)
        _say_lora(target)
    return target


def test_pickle_only_adapter_on_the_hub_is_refused(adapters, monkeypatch, no_unpickling):
    """A Hub repo with adapter_model.bin but no safetensors: refused before anything is injected, the pickle never
    downloaded, and the base left as it was (the Hub client is replaced by a stub here; tests/test_hub.py runs the
    real client against a server that changes its answers)."""
    import huggingface_hub
    import peft.config
    from huggingface_hub.errors import EntryNotFoundError

    root, base, images = adapters
    asked = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):  # the repo holds the config and the pickle only
        asked.append(filename)
        if filename != "adapter_config.json":
            raise EntryNotFoundError(f"{filename} not found")
        return str(root / "good" / filename)

    monkeypatch.setattr(peft.config, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: ["adapter_config.json",
                                                                                   "adapter_model.bin"])
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"'user/pickled' has no adapter_model\.safetensors.*never unpickles"):
        PeftModel.from_pretrained(fresh, "user/pickled")
    assert WEIGHTS in asked and not any(name.endswith(".bin") for name in asked)
    assert_unchanged(before, snapshot(fresh))


def test_state_dict_hook_refuses_nan_and_missing_scores(adapters):
    """Loads that bypass from_pretrained (set_peft_model_state_dict) are checked by the TAPS load hook."""
    from peft import set_peft_model_state_dict

    root, base, images = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "good").eval()
    before = snapshot(model)
    good = load_file(root / "good" / WEIGHTS)
    broken = {k: v.clone() for k, v in good.items()}
    broken[next(k for k in sorted(broken) if k.endswith(".taps_delta"))].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN/inf values .*: 1 tensor\(s\) or layer\(s\), e\.g\. `blocks\.0\."):
        set_peft_model_state_dict(model, broken)
    no_score = {k: v for k, v in good.items() if not k.endswith("blocks.0.mlp.fc1.taps_scores")}
    with pytest.raises(ValueError, match=r"no score for a gated layer: .*`blocks\.0\.mlp\.fc1`"):
        set_peft_model_state_dict(model, no_score)
    stray = {**good, "base_model.model.pos_embed": torch.zeros(1, 17, 192)}
    with pytest.raises(ValueError, match=r"holds tensors of modules the adapter does not declare.*`pos_embed`"):
        set_peft_model_state_dict(model, stray)
    assert_unchanged(before, snapshot(model))


# ----- training faults -----


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("datasets")
    from test_train import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no ``except Exception`` can swallow it."""


TRAIN_KW = dict(optimizer="sgd", lr=0.05, score_lr=0.2, lam=0.5, max_steps=4, batch_size=16, checkpoint_every=2,
                eval_split="none", log_every=1)


def test_nan_loss_stops_naming_the_step(data, tmp_path, monkeypatch):
    from test_train import vit_args
    from taps_peft.training import train

    calls, cross_entropy = {"n": 0}, F.cross_entropy

    def poisoned(*args, **kwargs):  # the loss of the 3rd optimizer step (micro-batch index 2) is NaN
        calls["n"] += 1
        value = cross_entropy(*args, **kwargs)
        return value + float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr("torch.nn.functional.cross_entropy", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(epoch 0, micro-batch 2.*stopped before"):
        train(vit_args(data, out, **TRAIN_KW))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # the last good state is kept
    assert not (out / WEIGHTS).exists()  # no adapter is saved from a diverged run
    from accelerate.state import AcceleratorState

    assert not AcceleratorState._shared_state  # reset even though train() raised: the next run may pick new settings


def test_checkpoint_killed_mid_save_keeps_the_previous_one_and_resume_matches(data, tmp_path, monkeypatch):
    """The save of step 4 dies half-way; step_2 is untouched, resume_from='latest' picks it, and the resumed run
    ends exactly where an uninterrupted run does (tests/test_train.py::test_resume_matches_uninterrupted proves
    resume == uninterrupted in general, with gradient accumulation and a mid-epoch checkpoint)."""
    from accelerate import Accelerator
    from test_train import vit_args
    from taps_peft.training.cli import _find_checkpoint, train

    full = train(vit_args(data, tmp_path / "full", **TRAIN_KW))

    save_state, calls = Accelerator.save_state, []

    def dies_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 1:
            return save_state(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half-written")
        raise Killed("killed during save_state")

    monkeypatch.setattr(Accelerator, "save_state", dies_on_second_save)
    out = tmp_path / "crashed"
    with pytest.raises(Killed):
        train(vit_args(data, out, **TRAIN_KW))
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp_step_4", "step_2"]
    assert _find_checkpoint(ckpts) == ckpts / "step_2"
    assert {p.name for p in (ckpts / "step_2").iterdir()} == {p.name for p in (tmp_path / "full/checkpoints/step_2")
                                                               .iterdir()}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    resumed = train(vit_args(data, out, resume_from="latest", **TRAIN_KW))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]  # the half-written folder is gone
    assert resumed["state"]["active"] == full["state"]["active"]
    assert resumed["state"]["scores"] == pytest.approx(full["state"]["scores"], abs=1e-6)
    assert resumed["state"]["trainable_sum"] == pytest.approx(full["state"]["trainable_sum"], rel=1e-6)
    assert [(h["step"], h["active"], h["acc"]) for h in resumed["history"]] == [
        (h["step"], h["active"], h["acc"]) for h in full["history"][2:]
    ]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"][2:]], rel=1e-5)


# ----- exact round trips in bf16 (float32: tests/test_lifecycle.py) -----


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit"])
def test_bf16_save_load_and_merge_unmerge_are_exact(family, tmp_path, images):
    torch.manual_seed(0)
    base = MODELS[family]().to(torch.bfloat16)
    fresh = copy.deepcopy(base)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    x = images.to(torch.bfloat16)
    with torch.no_grad():
        base_out = logits(copy.deepcopy(base).eval(), x)
    model = trained(base, x, steps=1)
    assert any(m.taps_delta["default"].abs().sum() > 0 for m in taps_layers(model))  # the step moved the deltas
    with torch.no_grad():
        expected = logits(model, x)
    assert expected.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(logits(loaded, x), expected)
    loaded.save_pretrained(tmp_path / "b")  # load -> save gives the same tensors
    first, second = load_file(tmp_path / "a" / WEIGHTS), load_file(tmp_path / "b" / WEIGHTS)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    layers = taps_layers(model)
    weights = [m.get_base_layer().weight.detach().clone() for m in layers]
    with torch.no_grad():
        model.merge_adapter(safe_merge=True)
        merged = logits(model, x)
        assert any(not torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, weights))
        model.unmerge_adapter()
        assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, weights))  # bit for bit
        assert torch.equal(logits(model, x), expected)
        torch.testing.assert_close(merged, expected, atol=0.1, rtol=0.05)  # one bf16 rounding per weight
        with model.disable_adapter():
            assert torch.equal(logits(model, x), base_out)
    saved = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "modules_to_save")}
    with torch.no_grad():
        for layer in layers:
            layer.taps_scores["default"].fill_(0.0)
        closed = logits(model, x)  # what unload keeps: the head and norm copies, no delta
    unloaded = model.unload()  # gated layers are the base again, bit for bit (head and norms keep the task's copies)
    for key, value in unloaded.state_dict().items():
        if key.rpartition(".")[0] not in saved:
            assert torch.equal(value, original[key]), key
    with torch.no_grad():  # a bf16 model that runs
        torch.testing.assert_close(logits(unloaded.eval(), x), closed, rtol=0, atol=0.05)


def test_norms_without_parameters_do_not_block_loading(tmp_path):
    """A saved adapter lists every norm layer of its base, also those without state (InstanceNorm, LayerNorm
    without affine): the pre-injection checks accept them and the round trip is exact."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.inorm, self.bn = nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.BatchNorm2d(8)
            self.ln, self.fc = nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.ln(self.bn(self.inorm(self.conv(x))).mean((2, 3))))

    base = Net()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, TAPSConfig(init_weights=False)).eval()
    assert sorted(model.peft_config["default"].modules_to_save) == ["bn", "fc", "inorm", "ln"]
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(fresh, tmp_path).eval()(x), model(x))


# ----- safetensors only, nothing unpickled, no remote code -----


def test_save_pretrained_writes_safetensors_only(tmp_path, images, vit_base):
    """PEFT honours safe_serialization=False and writes a pickle; TAPS then refuses to write the config beside it,
    saying why: the folder keeps the config bound to the earlier safetensors save, which still loads whole."""
    model = trained(copy.deepcopy(vit_base), images)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_model\.bin' is a pickle \(save_pretrained\(safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    loaded = PeftModel.from_pretrained(copy.deepcopy(vit_base), tmp_path).eval()  # the first save, whole
    with torch.no_grad():
        assert torch.equal(logits(loaded, images), logits(model.eval(), images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default path stays silent
        model.save_pretrained(tmp_path / "default")
    assert (tmp_path / "default" / WEIGHTS).is_file() and not (tmp_path / "default" / "adapter_model.bin").exists()


def test_loading_a_good_adapter_unpickles_nothing(adapters, no_unpickling):
    root, base, images = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "good", adapter_name="one")
    model.load_adapter(root / "good2", adapter_name="two")
    assert list(model.peft_config) == ["one", "two"]


def test_package_never_unpickles_or_runs_remote_code():
    """No taps_peft source calls torch.load / pickle / eval / exec, or passes trust_remote_code or weights_only=False
    (training checkpoints are Accelerate's save_state/load_state: see docs/guarantees.md)."""
    sources = sorted(PACKAGE.rglob("*.py"))
    assert {"report.py", "layer.py", "save.py", "cli.py", "weights.py"} <= {p.name for p in sources}  # every package
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in {"torch.load", "pickle.load", "pickle.loads", "eval", "exec", "load_peft_weights"}, (
                    f"{path.name}:{node.lineno} calls {name}")
                for kw in node.keywords:
                    assert kw.arg != "trust_remote_code", f"{path.name}:{node.lineno}"
                    assert not (kw.arg == "weights_only" and getattr(kw.value, "value", None) is False), path.name
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {a.name for a in node.names} | {getattr(node, "module", None)}
                assert not names & {"pickle", "dill", "cloudpickle", "joblib"}, f"{path.name}:{node.lineno}"
