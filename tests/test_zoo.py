"""Targets that are never silent no-ops, on a zoo of real architectures (tiny configurations, random weights).

For every model: the classifier is found and trained whole, the patch embedding is not gated, and every layer TAPS
gates by default changes the output when its gate opens with a nonzero delta (a layer whose weight its parent reads
directly, as timm's BEiT, torchvision's Swin and ``nn.MultiheadAttention`` do, would otherwise be a silent no-op)."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model

from taps_peft import TAPSConfig

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kw)


def _tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=5)


def _tv_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[2, 2], num_classes=5)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)


def _densenet():
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_classes=5)


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=5))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2))


# name: (constructor, head TAPS must train whole (None: the model has none), not gated (patch embedding), layers)
ZOO = {
    "timm_vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), "head", "patch_embed.proj", 8),
    "timm_beit": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                  "head", "patch_embed.proj", 8),
    "timm_resnet": (_timm("resnet10t"), "fc", None, None),
    "timm_convnext": (_timm("convnext_atto"), "head.fc", "stem.0", None),
    "timm_efficientnet": (_timm("efficientnet_b0"), "classifier", None, None),
    "timm_densenet": (_densenet, "classifier", None, None),
    "tv_vit": (_tv_vit, "heads", "conv_proj", 6),  # MLP linears and attention out_proj: in_proj is MHA's own
    "tv_resnet": (lambda: torchvision.models.resnet18(num_classes=5), "fc", None, 20),
    # the classifier is an MLP (Linear, Hardswish, Dropout, Linear): its hidden Linear is gated (timm's conv_head)
    "tv_mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5, width_mult=0.25),
                        "classifier.3", None, None),
    "tv_convnext": (_tv_convnext, "classifier", "features.0.0", None),
    "tv_swin": (_tv_swin, "head", "features.0.0", None),
    "hf_vit": (_hf_vit, "classifier", "vit.embeddings.patch_embeddings.projection", 12),
    "hf_bert": (_bert, "classifier", None, 13),
    "hf_clip_vision": (_clip_vision, None, "vision_model.embeddings.patch_embedding", 12),
}


def _output(model, name):
    with torch.no_grad():
        if name == "hf_bert":
            return model(input_ids=TOKENS).logits
        if name.startswith("hf_"):
            out = model(pixel_values=IMAGES)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state
        return model(IMAGES)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_default_gated_layer_changes_the_output(name):
    make, head, patch_embed, layers = ZOO[name]
    torch.manual_seed(0)
    base = make().eval()
    with torch.no_grad():  # no zero-initialised head or residual scale may hide a change (torchvision's ViT head)
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = _output(base, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(copy.deepcopy(base), TAPSConfig(init_weights=False)).eval()
    messages = [str(w.message) for w in caught]
    config = model.peft_config["default"]
    gated = model.base_model.taps_layers()
    assert layers is None or len(gated) == layers, [n for n, _ in gated]
    if head is None:
        assert any("found no classifier head" in m for m in messages)
    else:
        assert config.modules_to_save[0] == head and not any(n == head or n.startswith(head + ".") for n, _ in gated)
    if patch_embed is not None:
        assert patch_embed not in {n for n, _ in gated}
    if name == "tv_vit":
        assert any("MultiheadAttention" in m and "in_proj_weight" in m for m in messages)
    with torch.no_grad():
        for _, layer in gated:
            layer.taps_scores["default"].fill_(0.0)
            weight = layer.get_base_layer().weight
            layer.taps_delta["default"].copy_(torch.randn_like(weight) * (float(weight.std()) or 0.1))
    assert torch.equal(_output(model, name), expected)  # every gate closed: the base itself
    silent = []
    for layer_name, layer in gated:
        with torch.no_grad():
            layer.taps_scores["default"].fill_(1.0)
        if torch.equal(_output(model, name), expected):  # a bypassed weight changes nothing, not even a bit
            silent.append(layer_name)
        with torch.no_grad():
            layer.taps_scores["default"].fill_(0.0)
    assert silent == []  # no gated layer is a no-op


def test_a_classifier_mlp_trains_only_its_last_layer():
    """Issue 24: torchvision's vgg11 ends in a 3-Linear ``classifier`` (87% of its parameters). The head TAPS trains
    whole is its last Linear; the hidden ones are gated like every other layer (as timm's ``pre_logits``)."""
    with torch.device("meta"):  # shapes only: no 130M-parameter allocation
        base = torchvision.models.vgg11(weights=None, num_classes=5)
    total = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in base.classifier.parameters()) / total > 0.85
    model = get_peft_model(base, TAPSConfig())
    assert model.peft_config["default"].modules_to_save == ["classifier.6"]
    gated = {n for n, _ in model.base_model.taps_layers()}
    assert {"classifier.0", "classifier.3"} <= gated and "classifier.6" not in gated
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".taps_" not in n)
    assert head == 4096 * 5 + 5  # the final Linear only (its per-task copy)


@pytest.mark.parametrize("r", [None, 8])
def test_a_channels_last_model_trains_saves_reloads_and_merges(tmp_path, r):
    """timm's ``--channels-last`` (oneDNN's fast CPU convs): deltas take the weights' memory format, the file loads
    bit-exactly onto a channels_last base and to float rounding onto a contiguous one; at r 8 EfficientNet's big
    depthwise convs get factors (weight form)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval()
    model = get_peft_model(copy.deepcopy(base).to(memory_format=torch.channels_last),
                           TAPSConfig(r=r, init_weights=False, lam=0.1)).train()
    depthwise = [layer for _, layer in model.base_model.taps_layers() if layer.get_base_layer().groups > 1]
    assert depthwise and all(("default" in layer.taps_A) == (r is not None and layer.get_base_layer().out_channels
                                                             * 9 > r * (9 + layer.get_base_layer().out_channels))
                             for layer in depthwise if layer.get_base_layer().kernel_size == (3, 3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = IMAGES.contiguous(memory_format=torch.channels_last)
    (torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 3])) + model.taps_penalty()).backward()
    opt.step()
    model.eval()
    expected = _output(model, "timm_efficientnet")
    model.save_pretrained(tmp_path)
    for memory_format, atol in ((torch.channels_last, 0.0), (torch.contiguous_format, 1e-4)):
        loaded = PeftModel.from_pretrained(copy.deepcopy(base).to(memory_format=memory_format), tmp_path).eval()
        torch.testing.assert_close(_output(loaded, "timm_efficientnet"), expected, rtol=0, atol=atol)
    torch.testing.assert_close(_output(model.merge_and_unload(), "timm_efficientnet"), expected, rtol=0, atol=1e-4)


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)


def test_transformers_conv1d_layers_are_named_not_skipped_silently():
    """Issue 24: transformers' ``Conv1D`` (GPT-2 style, a Linear with a transposed weight) is not gated; a model with
    such layers gets one warning naming them, and a model with nothing else to gate an error naming them."""
    from transformers import GPT2Model

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.proj, self.head = GPT2Model(_gpt2_config()), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.proj(self.gpt(ids).last_hidden_state))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(Tagger(), TAPSConfig())
    conv1d = [str(w.message) for w in caught if "Conv1D" in str(w.message)]
    assert len(conv1d) == 1 and "4 transformers Conv1D layer(s)" in conv1d[0] and "gpt.h.0.attn.c_attn" in conv1d[0]
    assert {n for n, _ in model.base_model.taps_layers()} == {"proj"}
    with pytest.raises(ValueError, match=r"found no layer to gate in GPT2Model.*not transformers' Conv1D.*h\.0\.mlp"):
        get_peft_model(GPT2Model(_gpt2_config()), TAPSConfig())
