"""What ``taps-peft train`` does with the inputs users really have: 16-bit and other image modes, damaged images,
empty or single-class folders, a bad ``--weights`` file; and a card that keeps a user's text whatever markers it
holds. Every error is one line that names the file or folder and the fix."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from taps_peft.training.build import image_file
from taps_peft.training.cli import main
from test_train import VIT, make_imagefolder


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"path": "x.png", "bytes": buffer.getvalue()}


@pytest.mark.parametrize("mode, array, expected", [
    ("I;16", np.full((4, 4), 32768, dtype=np.uint16), 128),  # a 16-bit PNG at half range: grey, not white
    ("I;16", np.full((4, 4), 65535, dtype=np.uint16), 255),
    ("F", np.full((4, 4), 0.25, dtype=np.float32), 64),  # a float image in [0, 1]
    ("L", np.full((4, 4), 77, dtype=np.uint8), 77),
])
def test_image_modes_convert_to_8_bit_rgb(mode, array, expected):
    image = Image.fromarray(array)
    assert image.mode == mode
    value = _png(image) if mode != "F" else image  # PNG cannot hold floats: the decoded image itself
    rgb = image_file(value)
    assert rgb.mode == "RGB" and set(np.asarray(rgb).reshape(-1).tolist()) == {expected}


def test_palette_alpha_and_cmyk_images_convert():
    for image in (Image.new("P", (4, 4), 3), Image.new("RGBA", (4, 4), (10, 20, 30, 0)),
                  Image.new("LA", (4, 4), (50, 255)), Image.new("CMYK", (4, 4), (0, 0, 0, 0))):
        assert image_file(image).mode == "RGB"


def test_a_damaged_image_is_named():
    with pytest.raises(ValueError, match=r"cannot read the image data/c0/broken\.png \(.*\): fix or remove the file"):
        image_file({"path": "data/c0/broken.png", "bytes": b"\x89PNG\r\n\x1a\n not really"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("inputs"), n_train=8, n_test=4)


def _fails(capsys, tmp_path, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", VIT, "--cpu",
              "--max-steps", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
              "--cache-dir", str(tmp_path / "cache"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # (datasets may print its progress before)
    assert err.endswith("\n") and err.strip().splitlines()[-1].startswith("taps-peft train: error: "), err
    assert "Traceback" not in err and err.count("error:") == 1, err  # one line, not a traceback
    return err.strip().splitlines()[-1]


def test_cli_names_damaged_images_empty_and_single_class_folders(data, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "train" / "c1" / "3.png").write_bytes(b"not an image at all")
    assert "3.png" in _fails(capsys, tmp_path, "--dataset", f"imagefolder:{broken}", "--no-shuffle")
    (tmp_path / "empty").mkdir()
    assert "holds no image" in _fails(capsys, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'empty'}")
    single = tmp_path / "single"
    shutil.copytree(data / "train" / "c0", single / "only")
    err = _fails(capsys, tmp_path, "--dataset", f"imagefolder:{single}")
    assert "at least two classes" in err and "subfolder of its own" in err and "--label-column" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"just text\n", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."])
def test_cli_names_a_bad_weights_file(data, tmp_path, capsys, content):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content)
    err = _fails(capsys, tmp_path, "--dataset", f"imagefolder:{data}", "--weights", str(weights))
    assert "weights.pth" in err


@pytest.mark.parametrize("damage", ["nan", "int32"])
def test_cli_refuses_a_weights_file_with_nan_or_integer_tensors(data, tmp_path, capsys, damage):
    """--weights with a NaN value or an int32 tensor trained from it without a word; now one line names the tensor."""
    import json

    import safetensors.torch
    import timm

    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **json.loads(VIT)).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    key = "blocks.0.attn.qkv.weight"
    state[key] = state[key].clone().index_fill_(0, torch.tensor([0]), float("nan")) if damage == "nan" else (
        state[key] * 100).to(torch.int32)
    weights = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(state, str(weights))
    err = _fails(capsys, tmp_path, "--dataset", f"imagefolder:{data}", "--weights", str(weights))
    assert "weights.safetensors: tensor 'blocks.0.attn.qkv.weight'" in err and "Fix:" in err
    assert ("NaN or inf" if damage == "nan" else "int32") in err


@pytest.mark.parametrize("text", [
    "# Mine\n\n<!-- taps_peft:card:begin -->\nmy notes after a lone begin marker\n",
    "# Mine\n\n<!-- taps_peft:card:end -->\nnotes after a lone end marker\n",
    "# Mine\n\n<!-- taps_peft:card:end --> reversed <!-- taps_peft:card:begin -->\nkeep this\n",
])
def test_the_card_keeps_a_user_s_text_whatever_markers_it_holds(tmp_path, text):
    from peft import get_peft_model

    from taps_peft import TAPSConfig, save_model_card
    from conftest import tiny_timm_vit

    model = get_peft_model(tiny_timm_vit(), TAPSConfig())
    (tmp_path / "README.md").write_text(text)
    for _ in range(3):  # saved again and again: nothing of the user's is lost or duplicated
        card = save_model_card(model, tmp_path).read_text()
    for line in text.splitlines():
        assert line in card
    assert card.count("# TAPS adapter for") == 1
    with torch.no_grad():  # the TAPS section is refreshed, not appended
        next(p for n, p in model.named_parameters() if "score" in n).fill_(0.0)
    card = save_model_card(model, tmp_path).read_text()
    assert card.count("# TAPS adapter for") == 1 and "7/8" in card
