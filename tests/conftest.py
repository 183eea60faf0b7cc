"""Tiny random-init models shared by the tests (nothing is downloaded)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import taps_peft  # noqa: E402,F401  (registers TAPS with PEFT)

REPO = Path(__file__).resolve().parents[1]
HANG = 3600  # subprocess timeout: a guard against a hang, never a speed bound (a busy machine must not fail)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python, ``extra`` variables added and the checkout first on its path
    (the child imports this checkout's taps_peft, installed or not)."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI machines are shared


def tiny_timm_vit(num_classes: int = 5, depth: int = 2):
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32, patch_size=8, depth=depth
    )


def tiny_hf_vit(num_classes: int = 5):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_classes,
    )
    return ViTForImageClassification(cfg)


def tiny_resnet(num_classes: int = 5):
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def logits(model, x):
    out = model(x) if not hasattr(getattr(model, "config", None), "model_type") else model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


def optimizer_for(model, cls=torch.optim.AdamW, score_lr=None, **kwargs):
    """The user's optimizer: ``cls`` over every trainable parameter (TAPS steps the scores itself, at
    ``TAPSConfig.score_lr``, which ``score_lr`` sets on every adapter when given)."""
    if score_lr is not None:
        for config in model.peft_config.values():
            config.score_lr = score_lr
    kwargs.setdefault("weight_decay", 0.0)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


MODELS = {"timm_vit": tiny_timm_vit, "hf_vit": tiny_hf_vit, "timm_resnet": tiny_resnet}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32)


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests (minutes each) run last, so the test command reports from its first minute."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: the rest keep their order
