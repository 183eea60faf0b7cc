"""Low-rank gated deltas, ``TAPSConfig(r=...)``: W = W_base + 1[s >= tau] * (alpha / r) * B @ A under the TAPS score,
gate, straight-through estimator and penalty. Forward and gradients against an explicit computation (both forward
paths forced), host reads, every adapter flow (save/load, merge, mixed batches, several adapters, budgets, LoRA
export, joint training, the CLI)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import taps_peft
from taps_peft import TAPSConfig, TAPSLayer
from taps_peft.tuner import lowrank
from conftest import logits, tiny_hf_vit, tiny_resnet, tiny_timm_vit
from test_stateless import HostReads

WEIGHTS = "adapter_model.safetensors"


def layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


def force(monkeypatch, path):
    """Make every low-rank layer take one forward path: "factored" (B(A(x))) or "weight" (one formed weight)."""
    if path is not None:
        monkeypatch.setattr(lowrank, "prefers_factored", lambda *a, **k: path == "factored")


def close_every_other(model, adapter="default", offset=0):
    with torch.no_grad():
        for i, layer in enumerate(layers(model)):
            if adapter in layer.taps_scores:
                layer.taps_scores[adapter].fill_(0.5 if (i + offset) % 2 else 0.0)


def half_open(make, images, alpha):
    """(base, a rank-4 TAPS model on a copy with every other gate closed, its outputs on ``images``)."""
    base = make().eval()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(r=4, alpha=alpha, init_weights=False)).eval()
    close_every_other(model)
    with torch.no_grad():
        return base, model, model(images)


class Net(nn.Module):
    """One layer of each kind: factored Linear/Conv2d/Conv1d/depthwise conv, and a layer that keeps a full delta."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="reflect")
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # 4 * (9 + 16) < 144: factored, weight form
        self.conv1d = nn.Conv1d(16, 12, 3)
        self.small = nn.Linear(12, 4)  # 4 * (12 + 4) = 64 >= 48: full delta
        self.fc = nn.Linear(4 * 14, 40)

    def forward(self, x):
        x = self.depthwise(self.dilated(self.conv(x)))
        x = self.conv1d(x.flatten(2)[..., :16])
        return self.fc(self.small(x.transpose(1, 2)).flatten(1))


NAMES = ["conv", "dilated", "depthwise", "conv1d", "small", "fc"]
FACTORED = {"conv", "dilated", "depthwise", "conv1d", "fc"}


def net_model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    base = Net().to(dtype)
    config = TAPSConfig(target_modules=NAMES, r=4, alpha=8.0, init_weights=False, lam=0.0, modules_to_save=[], **kw)
    return base, get_peft_model(copy.deepcopy(base), config)


def explicit(model, x, gate_ste=False):
    """The oracle: each gated layer run functionally with W_base + g * scale * B @ A (or W_base + g * dW), computed
    here from the parameters; ``gate_ste``: g = 1[s >= tau] + s - s.detach() (the straight-through gate)."""
    plain = copy.deepcopy(model.get_base_model())
    weights = {}
    for name in NAMES:
        layer = model.get_base_model().get_submodule(name)
        s = layer.taps_scores["default"]
        gate = (s >= layer.taps_tau["default"]).to(s.dtype)
        g = gate + s - s.detach() if gate_ste else gate.detach()
        if "default" in layer.taps_A:
            a, b = layer.taps_A["default"], layer.taps_B["default"]
            shape = layer.get_base_layer().weight.shape
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(shape) * 2.0  # alpha / r = 8 / 4
        else:
            delta = layer.taps_delta["default"]
        weights[name] = layer.get_base_layer().weight.detach() + g.to(delta.dtype) * delta
        setattr(plain, name, plain.get_submodule(name).get_base_layer())
    return torch.func.functional_call(plain, {f"{n}.weight": w for n, w in weights.items()}, (x,))


# ----- config, which layers get factors -----


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, r"TAPSConfig\.r=0 is invalid: use an int >= 1"),
    ({"r": 2.5}, r"TAPSConfig\.r=2\.5 is invalid"),
    ({"r": True}, r"TAPSConfig\.r=True is invalid"),
    ({"alpha": 8}, r"TAPSConfig\.alpha=8 is set without r.*Set r too"),
    ({"r": 4, "alpha": 0}, r"TAPSConfig\.alpha=0 is invalid: use a finite float > 0"),
    ({"r": 4, "alpha": float("nan")}, r"TAPSConfig\.alpha=nan is invalid"),
])
def test_bad_r_and_alpha_name_field_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TAPSConfig(**kwargs)


def test_the_default_scale_lets_a_low_rank_delta_step_as_a_full_delta_does():
    """Without alpha each layer's scale is STEP_GAIN * sqrt(3 fan_in / r): one Adam step of B (each entry by about lr)
    moves the weight's entries by about STEP_GAIN * lr on average, as STEP_GAIN steps of a full delta would; alpha
    gives LoRA's alpha / r."""
    from taps_peft.tuner.lowrank import STEP_GAIN

    for conv in (nn.Conv2d(96, 24, 1), nn.Conv2d(16, 32, 3), nn.Linear(1152, 64)):
        model = get_peft_model(nn.Sequential(conv), TAPSConfig(r=8, target_modules=["0"], modules_to_save=[]))
        layer = layers(model)[0]
        with torch.no_grad():
            layer.taps_B["default"].copy_(torch.sign(torch.randn_like(layer.taps_B["default"])) * 1e-3)  # lr 1e-3
            moved = layer.delta("default").abs().mean().item()
        assert moved == pytest.approx(STEP_GAIN * 1e-3 * (2 / torch.pi) ** 0.5, rel=0.25)  # E|sum of r signs|
    explicit = get_peft_model(nn.Sequential(nn.Linear(64, 64)), TAPSConfig(r=8, alpha=16, target_modules=["0"]))
    assert layers(explicit)[0].taps_scaling["default"] == 2.0


def test_r_none_changes_nothing_and_its_files_have_no_new_field(tmp_path, images):
    assert TAPSConfig().r is None
    base = tiny_timm_vit()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False))
    names = {n.rsplit(".", 2)[1] for n, _ in model.named_parameters() if ".taps_" in n}
    assert names == {"taps_delta", "taps_scores"}
    assert all(not m.taps_A and not m.taps_rank for m in layers(model))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "r" not in saved and "alpha" not in saved
    keys = set(load_file(tmp_path / WEIGHTS))
    assert {k.rsplit(".", 1)[1] for k in keys if ".taps_" in k} == {"taps_delta", "taps_scores"}
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].r is None


def test_which_layers_get_factors_and_their_shapes():
    _, model = net_model()
    got = {n: "default" in model.get_base_model().get_submodule(n).taps_A for n in NAMES}
    assert {n for n, f in got.items() if f} == FACTORED
    net = model.get_base_model()
    assert net.fc.taps_A["default"].shape == (4, 56) and net.fc.taps_B["default"].shape == (40, 4)
    assert net.conv.taps_A["default"].shape == (4, 3, 3, 3) and net.conv.taps_B["default"].shape == (16, 4, 1, 1)
    assert net.conv1d.taps_B["default"].shape == (12, 4, 1)
    assert net.depthwise.taps_A["default"].shape == (4, 1, 3, 3)
    assert net.depthwise.taps_B["default"].shape == (16, 4, 1, 1)
    assert net.small.taps_delta["default"].shape == net.small.get_base_layer().weight.shape
    assert net.fc.taps_scaling["default"] == 2.0 and net.fc.taps_rank["default"] == 4
    # a rank whose factors would not be smaller than the weight keeps full deltas everywhere
    big = get_peft_model(Net(), TAPSConfig(target_modules=NAMES, r=64, modules_to_save=[]))
    assert all(not m.taps_A and "default" in m.taps_delta for m in layers(big))


@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_resnet, tiny_hf_vit], ids=["timm_vit", "resnet", "hf_vit"])
def test_identity_at_init(make, images):
    base = make().eval()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(r=4)).eval()
    assert all("default" in m.taps_A and not m.taps_B["default"].any() for m in layers(model))
    assert all(m.taps_A["default"].abs().sum() > 0 for m in layers(model))  # LoRA's init: A random, B zero
    with torch.no_grad():
        assert torch.equal(logits(model, images), logits(base, images))


# ----- forward and gradients against the explicit computation -----


@pytest.mark.parametrize("path", ["weight", "factored"])
def test_forward_matches_explicit_computation(monkeypatch, path):
    _, model = net_model()
    calls = []
    original = lowrank.factored_output
    monkeypatch.setattr(lowrank, "factored_output", lambda *a: calls.append(a[0]) or original(*a))
    force(monkeypatch, path)
    close_every_other(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = explicit(model, x)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-6)  # gates read on the host
    torch.testing.assert_close(model.train()(x).detach(), expected, rtol=1e-5, atol=1e-6)  # device gates, STE
    assert bool(calls) == (path == "factored")
    assert all(getattr(base, "groups", 1) == 1 for base in calls)  # a depthwise conv's factors run as a weight
    net = model.get_base_model()
    for name in FACTORED:  # the effective weight and the gated delta include the low-rank delta
        layer = net.get_submodule(name)
        gate = float(layer.is_active("default"))
        dw = (layer.taps_B["default"].flatten(1) @ layer.taps_A["default"].flatten(1)).reshape(layer.weight.shape)
        torch.testing.assert_close(layer.get_delta_weight("default"), gate * 2.0 * dw.detach())
        with torch.no_grad():
            torch.testing.assert_close(layer.weight, layer.get_base_layer().weight + gate * 2.0 * dw)


@pytest.mark.parametrize("path", ["weight", "factored"])
def test_gradients_match_explicit_computation_and_closed_gates_can_reopen(monkeypatch, path):
    force(monkeypatch, path)
    _, model = net_model(torch.float64)
    close_every_other(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model.train()
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    explicit(reference, x, gate_ste=True).square().sum().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    net = model.get_base_model()
    closed = [n for n in FACTORED if not net.get_submodule(n).is_active("default")]
    assert closed
    for name in closed:  # DDP-safe: zero (not None) factor gradients; a nonzero score gradient
        layer = net.get_submodule(name)
        assert not layer.taps_A["default"].grad.any() and not layer.taps_B["default"].grad.any()
        assert layer.taps_scores["default"].grad.abs().item() > 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(reentrant, images):
    """Reentrant checkpointing runs the forward without grad, then with it: both take the same path, bit for bit."""
    model = get_peft_model(tiny_hf_vit(), TAPSConfig(r=4, init_weights=False, lam=0.3)).train()
    close_every_other(model)
    checkpointed = copy.deepcopy(model)
    vit = checkpointed.base_model.model
    vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        vit.enable_input_require_grads()
    grads = []
    for m in (model, checkpointed):
        (m(pixel_values=images).logits.square().sum() + m.taps_penalty()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".taps_A." in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("path", ["weight", "factored"])
@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_resnet], ids=["vit", "resnet"])
def test_a_training_step_reads_nothing_on_the_host(monkeypatch, make, path, images):
    force(monkeypatch, path)
    model = get_peft_model(make(), TAPSConfig(lam=0.5, r=4))
    close_every_other(model)
    model.train()
    with HostReads() as counter:
        loss = F.cross_entropy(model(images), torch.arange(4) % 5) + model.taps_penalty()
        loss.backward()
    assert counter.reads == []
    assert all(p.grad is not None for m in layers(model) for p in m.adapter_params("default"))


def test_training_picks_the_factored_path_where_it_is_cheaper(images):
    assert lowrank.prefers_factored(rows=68, fan_in=192, out=576, r=4)
    assert not lowrank.prefers_factored(rows=32 * 56 * 56, fan_in=576, out=64, r=4)
    assert lowrank.prefers_factored(rows=32 * 56 * 56, fan_in=576, out=64, r=4, backward=True)  # no grad(W)
    assert not lowrank.prefers_factored(rows=10**6, fan_in=576, out=64, r=4, backward=True, base_trains=True)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert lowrank.output_rows(conv, torch.zeros(4, 3, 9, 9)) == 4 * 5 * 5 == conv(torch.zeros(4, 3, 9, 9))[:, 0].numel()


def saved_bytes(model, x):
    """Bytes of the distinct tensors a forward saves for its backward (what a training step holds per layer)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_factored_gated_layer_saves_no_more_for_backward_than_lora(kind):
    """The gate multiplies the r-channel middle of B(A(x)), so the score's gradient costs rows x r saved numbers, not a
    full output per layer (counted, not timed: that was 46% more peak training memory than LoRA on a ViT)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96)) if kind == "linear" else nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    x = torch.randn(256, 64, requires_grad=True) if kind == "linear" else torch.randn(8, 16, 12, 12, requires_grad=True)
    taps = get_peft_model(copy.deepcopy(base), TAPSConfig(target_modules=["0"], r=4, modules_to_save=[])).train()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["0"], r=4, lora_dropout=0.0)).train()
    (layer,) = layers(taps)
    assert layer._runs_factored(x, "default") and layer.taps_scores["default"].requires_grad
    middle = 4 * lowrank.output_rows(layer.get_base_layer(), x) * 4  # A(x) once more, for the score: rows x r floats
    assert saved_bytes(taps, x) <= saved_bytes(lora, x) + middle + 64  # + the score and its gate: a few scalars


# ----- adapter flows -----


@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_resnet], ids=["vit", "resnet"])
def test_save_load_is_bit_exact_with_only_active_factors(make, tmp_path, images):
    base, model, expected = half_open(make, images, alpha=2.0)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    for name, layer in model.base_model.taps_layers():
        saved = {p for p in ("taps_A", "taps_B", "taps_delta") if f"base_model.model.{name}.{p}" in keys}
        assert saved == ({"taps_A", "taps_B"} if layer.is_active("default") else set()), name
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)
    assert all(m.has_delta("default") == m.is_active("default") for m in layers(loaded))  # inference: active only
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(trainable(images), expected)
    for layer in layers(trainable):  # a closed layer may reopen and learn: B = 0, A fresh (LoRA's init)
        assert layer.taps_A["default"].requires_grad and layer.taps_A["default"].any()
        if not layer.is_active("default"):
            assert not layer.taps_B["default"].any()
    # a later save in which a layer closed at the first load is open: it gets its factors back
    first = next(m for m in layers(model) if not m.is_active("default"))
    with torch.no_grad():
        first.taps_scores["default"].fill_(0.3)
        late = model(images)
    model.save_pretrained(tmp_path / "late")
    loaded.load_adapter(tmp_path / "late", adapter_name="default")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), late)
    loaded.delete_adapter("default")
    assert not any(m.taps_A or m.taps_B or m.taps_rank or m.taps_scaling for m in layers(loaded))


def test_loading_refuses_factors_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    from taps_peft.trust.load import tensors_digest

    base = tiny_timm_vit()
    get_peft_model(copy.deepcopy(base), TAPSConfig(r=4, init_weights=False)).save_pretrained(tmp_path / "good")
    key = "base_model.model.blocks.1.mlp.fc1.taps_"
    faults = {
        "one_factor": (lambda t, c: t.pop(key + "B"), r"incomplete: the layer `blocks\.1\.mlp\.fc1` is active"),
        "other_rank": (lambda t, c: c.update(r=8), r"factor A for `blocks\.0\.attn\.qkv` has shape \(4, 192\) but rank 8"),
        "full_config": (lambda t, c: c.update(r=None), r"holds `blocks\.0\.attn\.qkv\.taps_A` but the adapter's config"),
    }
    for fault, (edit, message) in faults.items():
        folder = tmp_path / fault
        folder.mkdir()
        tensors, config = load_file(tmp_path / "good" / WEIGHTS), json.loads((tmp_path / "good/adapter_config.json").read_text())
        edit(tensors, config)
        save_file(tensors, folder / WEIGHTS)
        config["weights_digest"] = tensors_digest(tensors.values())
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(copy.deepcopy(base), folder)


@pytest.mark.parametrize("path", ["weight", "factored"])
def test_merge_unmerge_unload_and_disable(monkeypatch, path, images):
    force(monkeypatch, path)
    base = tiny_resnet().eval()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(r=4, init_weights=False)).eval()
    close_every_other(model)
    weights = {n: m.get_base_layer().weight.clone() for n, m in model.base_model.taps_layers()}
    with torch.no_grad():
        expected, plain = model(images), base(images)
        model.merge_adapter()
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        assert all(torch.equal(m.get_base_layer().weight, weights[n]) for n, m in model.base_model.taps_layers())
        assert torch.equal(model(images), expected)
        with model.disable_adapter():
            assert torch.equal(model(images), plain)
    unloaded = model.unload()
    assert all(torch.equal(unloaded.get_submodule(n).weight, w) for n, w in weights.items())


def test_mixed_batches_and_several_adapters(images):
    base = tiny_timm_vit().eval()
    model = get_peft_model(copy.deepcopy(base), TAPSConfig(r=4, init_weights=False), adapter_name="u")
    model.add_adapter("v", TAPSConfig(init_weights=False))  # a full-delta adapter beside a low-rank one
    model.add_adapter("w", TAPSConfig(r=2, alpha=4.0, init_weights=False))
    close_every_other(model, "u")
    close_every_other(model, "w", offset=1)
    model.eval()
    single = {}
    with torch.no_grad():
        for name in "uvw":
            model.set_adapter(name)
            single[name] = model(images)
        with model.disable_adapter():
            single["__base__"] = model(images)
        names = ["u", "w", "__base__", "v"]
        mixed = model(images, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], rtol=0, atol=1e-5)
    # two adapters active at once add their open deltas (the head and norms are one adapter's at a time in PEFT)
    two = get_peft_model(copy.deepcopy(base), TAPSConfig(r=4, init_weights=False, modules_to_save=[],
                                                         train_norms=False), adapter_name="u")
    two.add_adapter("w", TAPSConfig(r=2, alpha=4.0, init_weights=False, modules_to_save=[], train_norms=False))
    close_every_other(two, "u")
    two.base_model.set_adapter(["u", "w"])
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in two.base_model.taps_layers():
            reference.get_submodule(name).weight += layer.get_delta_weight("u") + layer.get_delta_weight("w")
        torch.testing.assert_close(two.eval()(images), reference(images), rtol=0, atol=1e-5)


def test_dtype_policy_freeze_gates_and_compile(images):
    bf16 = tiny_timm_vit().to(torch.bfloat16)
    up = get_peft_model(copy.deepcopy(bf16), TAPSConfig(r=4))
    assert {p.dtype for m in layers(up) for p in (m.taps_A["default"], m.taps_B["default"])} == {torch.float32}
    same = get_peft_model(copy.deepcopy(bf16), TAPSConfig(r=4), autocast_adapter_dtype=False)
    assert {m.taps_A["default"].dtype for m in layers(same)} == {torch.bfloat16}
    up.train()
    up(images.bfloat16()).float().square().mean().backward()  # fp32 factors of a bf16 base train
    assert all(m.taps_B["default"].grad.dtype == torch.float32 for m in layers(up))

    model = get_peft_model(tiny_timm_vit(), TAPSConfig(r=4, init_weights=False))
    close_every_other(model)
    model.base_model.freeze_gates()
    model.train()
    model(images).square().mean().backward()
    for m in layers(model):  # frozen gates: a closed layer is its base layer (no factor gradient at all)
        assert (m.taps_A["default"].grad is not None) == m.is_active("default")
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(torch.compile(model, backend="eager")(images), model(images), rtol=0, atol=1e-5)


def test_budget_bytes_are_the_bytes_saved(tmp_path):
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(r=4, init_weights=False, budget_mib=1.0))
    close_every_other(model)
    rows = {r["name"]: r for r in taps_peft.taps_layer_report(model)}
    qkv = model.get_base_model().blocks[0].attn.qkv
    assert rows["blocks.0.attn.qkv"]["params"] == 4 * (qkv.in_features + qkv.out_features)
    model.save_pretrained(tmp_path)
    saved = sum(t.nbytes for t in load_file(tmp_path / WEIGHTS).values())
    assert taps_peft.taps_summary(model)["adapter_bytes"] == saved
    active = sum(r["bytes"] for r in rows.values() if r["active"])
    assert taps_peft.budget_usage(model)["mib"] == active / 2**20


@pytest.mark.parametrize("make", [tiny_resnet, tiny_timm_vit], ids=["resnet", "vit"])
def test_export_lora_is_exact_at_rank_r(make, tmp_path, images):
    base, model, expected = half_open(make, images, alpha=8.0)
    info = taps_peft.export_lora(model, tmp_path)
    active = {n for n, m in model.base_model.taps_layers() if m.is_active("default")}
    assert info["lora_layers"] == {n: 4 for n in active} and info["saved_whole"] == []
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name in active:
        taps, lora = model.get_base_model().get_submodule(name), loaded.base_model.model.get_submodule(name)
        assert torch.equal(lora.lora_A["default"].weight, taps.taps_A["default"])
        assert torch.equal(lora.lora_B["default"].weight, taps.taps_B["default"] * 2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=1e-5)


def test_joint_training_one_step():
    from taps_peft.training.multitask import base_state_dict, train_joint

    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    base = tiny_timm_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = train_joint(base, {"u": (x, y), "v": (x.flip(-1), y)}, TAPSConfig(r=4, lam=0.1), 1, batch_size=8,
                        train_base="gated", accelerator=_cpu_accelerator())
    qkv = model.get_base_model().blocks[0].attn.qkv
    assert all(qkv.taps_B[t].any() for t in "uv")  # each task's factors moved
    assert not torch.equal(base_state_dict(model)["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def _cpu_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_cli_trains_low_rank_deltas_and_says_so(tmp_path, capsys):
    pytest.importorskip("datasets")
    from test_train import make_imagefolder, vit_args
    from taps_peft.training.cli import train

    data = make_imagefolder(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "run"
    metrics = train(vit_args(data, out, r=4, alpha=8.0, max_steps=2, batch_size=8, eval_split="none"))
    assert metrics["step"] == 2
    assert "low-rank deltas r=4, alpha=8" in capsys.readouterr().out  # the log says what it trains
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["alpha"] == 8.0
    assert any(k.endswith(".taps_A") for k in load_file(out / WEIGHTS))
