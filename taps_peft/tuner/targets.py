"""Which modules TAPS gates, trains in full (head) or copies per task (norms), found by looking at the model."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper

from .layer import _CONV, SUPPORTED_LAYERS

# A ViT's patch embedding is not gated (paper: ViT-S/16 has L = 48 = 12 blocks x {qkv, proj, fc1, fc2}).
_PATCH_EMBED_NAMES = ("patch_embed", "patch_embeddings", "patch_embedding")
# Classifier heads: timm, torchvision (ResNet ``fc``, ViT ``heads``, MobileNet/ConvNeXt/EfficientNet ``classifier``,
# Swin ``head``), transformers (``classifier``, ``score``).
_HEAD_ATTRS = ("classifier", "head", "heads", "fc", "score")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules`` as if no adapter were injected: wrappers stand for the modules they wrap."""
    out: dict[str, nn.Module] = {}
    hidden: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") for h in hidden):
            continue
        if isinstance(module, BaseTunerLayer):
            hidden.append(name)
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            hidden.append(name)
            module = module.original_module
        out[name] = module
    return out


def find_head(model: nn.Module) -> Optional[str]:
    """Name of the classifier head: timm's ``pretrained_cfg['classifier']``, else a top-level classifier/head/fc.
    A head that is an ``nn.Sequential`` MLP (torchvision's VGG and MobileNetV3 ``classifier``: Linear, ..., Linear) is
    its last Linear/Conv: the hidden layers are pretrained features, gated like the rest (timm calls them
    ``pre_logits`` / ``conv_head`` and names only the last layer its classifier).

    Example:
        >>> find_head(timm.create_model("resnet18", pretrained=False))  # doctest: +SKIP
        'fc'
        >>> find_head(torchvision.models.vgg11())  # doctest: +SKIP
        'classifier.6'
    """
    modules = plain_modules(model)
    timm_head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    candidates = [timm_head] if isinstance(timm_head, str) else []
    for name in candidates + list(_HEAD_ATTRS):
        module = modules.get(name)
        if module is not None and any(p.numel() for p in module.parameters()):
            if isinstance(module, nn.Sequential):
                layers = [n for n, m in modules.items() if n.startswith(name + ".") and isinstance(m, SUPPORTED_LAYERS)]
                if len(layers) > 1:
                    return layers[-1]
            return name
    return None


def default_targets(model: nn.Module, head: Optional[str]) -> list[str]:
    """Full names of every Linear/Conv except the head and a patch embedding (the layers the paper gates).

    A patch embedding is recognised by name (``patch_embed``, ``patch_embeddings``) and by role: a convolution over
    the image (at most 4 input channels) whose kernel equals its stride, i.e. that cuts the image into patches
    (torchvision's ``conv_proj``, a Swin or ConvNeXt stem). ``nn.MultiheadAttention`` computes with its own
    ``in_proj_weight``, which TAPS does not gate (a warning says so); its ``out_proj`` is gated.
    """
    modules = plain_modules(model)
    names = [
        name
        for name, module in modules.items()
        if isinstance(module, SUPPORTED_LAYERS)
        and not _is_under(name, head)
        and not any(part in _PATCH_EMBED_NAMES for part in name.split("."))
        and not is_patch_embedding(module)
    ]
    conv1d = [n for n, m in modules.items() if _is_hf_conv1d(m) and not _is_under(n, head)]
    if conv1d and names:
        warnings.warn(
            f"{len(conv1d)} transformers Conv1D layer(s) (GPT-2 style, a Linear with a transposed weight) are not "
            f"gated: {_few(conv1d, 4)}. TAPS gates nn.Linear / nn.Conv1d/2d/3d only; these layers stay shared with the "
            "base (train them in full with modules_to_save=[...] if they must adapt).", UserWarning, stacklevel=2,
        )
    attention = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        warnings.warn(
            f"{len(attention)} nn.MultiheadAttention module(s) (e.g. `{attention[0]}`): TAPS gates their `out_proj` but "
            "not their fused q/k/v projection `in_proj_weight`, a bare parameter that the module reads directly.",
            UserWarning, stacklevel=2,
        )
    if not names:
        raise ValueError(
            f"TAPS found no layer to gate in {type(model).__name__}: it gates {[t.__name__ for t in SUPPORTED_LAYERS]} "
            "outside the head and patch embedding"
            + (f" (not transformers' Conv1D, GPT-2 style: {_few(conv1d, 4)})" if conv1d else "")
            + ". Pass `target_modules=[...]` naming the layers to adapt."
        )
    return names


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, ImageGPT): a Linear whose weight is stored (in, out). Not gated."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def is_patch_embedding(module: nn.Module) -> bool:
    """A convolution over the image (at most 4 input channels) that cuts it into non-overlapping patches."""
    if not isinstance(module, _CONV):
        return False
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    return module.in_channels <= 4 and kernel == stride and max(kernel) > 1


def check_targets(model: nn.Module, target_modules: Union[str, set[str], list[str]]) -> None:
    """Raise a ValueError naming every ``target_modules`` entry that matches no module, and what is there."""
    modules = plain_modules(model)
    names = [n for n in modules if n]
    if isinstance(target_modules, str):
        missing = [] if any(re.fullmatch(target_modules, n) for n in names) else [target_modules]
    else:
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        gateable = [n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS)]
        raise ValueError(
            f"TAPSConfig.target_modules: {sorted(missing)} matched no module of {type(model).__name__}. "
            f"Gateable layers include {_few(gateable)}; "
            "fix the names, or pass target_modules=None for the default layers. (Loading a saved adapter? It does "
            "not fit this base model: load it onto the base it was trained from.)"
        )


def planned_targets(model: nn.Module, config, requested: object) -> list[str]:
    """The layers PEFT will gate with ``config`` (its own matching rules), checked before any module is replaced:
    a ValueError if none is left after ``exclude_modules`` and ``modules_to_save``, a TypeError naming every
    target that is not a Linear/Conv. ``requested`` is the user's ``target_modules`` (None: the defaults)."""
    modules = plain_modules(model)
    targets = [n for n in modules if n and check_target_module_exists(config, n)]
    if not targets:
        only_targets = SimpleNamespace(target_modules=config.target_modules, target_parameters=None)
        matched = [n for n in modules if n and check_target_module_exists(only_targets, n)]
        shown = "None (the default layers)" if requested is None else repr(requested)
        raise ValueError(
            f"TAPSConfig.target_modules={shown} is invalid for {type(model).__name__}: it leaves no layer to gate. "
            f"The layers it matches ({_few(matched)}) are all excluded by exclude_modules={config.exclude_modules!r} "
            f"or trained in full by modules_to_save={config.modules_to_save!r}. Use target_modules=None for the "
            "default layers, or name Linear/Conv layers outside exclude_modules and modules_to_save."
        )
    unsupported = [
        f"`{n}` ({type(modules[n]).__name__})" for n in targets if not isinstance(modules[n], SUPPORTED_LAYERS)
    ]
    if unsupported:
        raise TypeError(
            f"TAPSConfig.target_modules: TAPS cannot gate {', '.join(unsupported[:8])}"
            f"{' ...' if len(unsupported) > 8 else ''}: it supports "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} and their subclasses. "
            "Remove it from `target_modules` or add it to `exclude_modules`."
        )
    for name in targets:
        check_gateable(name, modules[name])
    return targets


def check_gateable(name: str, layer: nn.Module) -> None:
    """A TAPS layer adds a full-size delta to the layer's weight and runs the layer's computation with it, so the weight
    must be an ordinary floating-point tensor held by the layer: quantized layers (bitsandbytes, GPTQ, torchao, ...)
    and layers whose weight Accelerate offloads (a device map with "cpu" or "disk") are refused."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter) or not (
        weight.is_floating_point()
    ):
        kind = type(weight).__name__ if isinstance(weight, torch.Tensor) else "no tensor"
        dtype = getattr(weight, "dtype", None)
        raise TypeError(
            f"TAPS cannot gate `{name}` ({type(layer).__name__}): its weight is {kind} of dtype {dtype}, not a "
            "floating-point tensor (a quantized layer?). TAPS adds a full-size delta to the weight: load the base "
            "model unquantized, or add the layer to `exclude_modules`."
        )
    if hasattr(layer, "_hf_hook"):
        raise TypeError(
            f"TAPS cannot gate `{name}` ({type(layer).__name__}): Accelerate hooks it (a device_map that offloads "
            "weights to 'cpu' or 'disk'), and TAPS needs the weight resident to add its delta. Load the model on one "
            "device (no offloading), or add the layer to `exclude_modules`."
        )


def saved_modules(model: nn.Module, modules_to_save: Optional[list[str]]) -> dict[str, list[str]]:
    """For each ``modules_to_save`` entry, the modules it wraps (PEFT matches entries as plain name suffixes)."""
    names = [n for n in plain_modules(model) if n]
    out: dict[str, list[str]] = {}
    for entry in modules_to_save or []:
        found: list[str] = []
        for name in names:
            if name.endswith(entry) and not any(name.startswith(f + ".") for f in found):
                found.append(name)
        out[entry] = found
    return out


# The heads PEFT's task models add to ``modules_to_save`` (``task_type="SEQ_CLS"`` adds both classifier and score).
_PEFT_TASK_HEADS = ("classifier", "score", "qa_outputs")


def check_modules_to_save(model: nn.Module, modules_to_save: Optional[list[str]], task_type: Any = None) -> None:
    """Raise a ValueError naming every ``modules_to_save`` entry that matches no module with parameters or buffers
    (TAPS puts such modules back unwrapped: nothing would be trained or saved). Norm layers count even without
    state, as a saved adapter lists every norm layer of its base. With a ``task_type``, the head names PEFT adds
    itself may match nothing (a BERT classifier has no ``score``), as for LoRA."""
    modules = plain_modules(model)
    missing = [
        entry
        for entry, found in saved_modules(model, modules_to_save).items()
        if not any(modules[n].state_dict() or isinstance(modules[n], _NORM_TYPES) for n in found)
        and not (task_type is not None and entry in _PEFT_TASK_HEADS)
    ]
    if missing:
        top = [n for n in plain_modules(model) if n and "." not in n]
        raise ValueError(
            f"TAPSConfig.modules_to_save: {sorted(missing)} matched no module with parameters in "
            f"{type(model).__name__} (entries match module names or their endings). Its top-level modules are "
            f"{_few(top)}; fix the names, or pass modules_to_save=None for the detected classifier head "
            f"({find_head(model)!r}). (Loading a saved adapter? It does not fit this base model: load it onto the "
            "base it was trained from.)"
        )


def _few(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''}"


def norm_modules(model: nn.Module, skip: Optional[list[str]] = None) -> list[str]:
    """Full names of norm layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm) outside the modules in ``skip``."""
    skip = skip or []
    return [
        name
        for name, module in plain_modules(model).items()
        if name and isinstance(module, _NORM_TYPES) and not any(_is_under(name, s) for s in skip)
    ]


def _is_under(name: str, parent: Optional[str]) -> bool:
    return parent is not None and (name == parent or name.startswith(parent + "."))


def resolve_targets(model: nn.Module, config: Any) -> Optional[str]:
    """Fill in ``config`` (the tuner's own copy) for ``model``: the head in ``modules_to_save`` (a warning when there
    is none), the default targets, the norm layers; every name is checked before any module is replaced. Returns the
    head's name."""
    head = find_head(model)
    if config.modules_to_save is None and head is not None:
        config.modules_to_save = [head]
    elif head is None and config.modules_to_save is None and config.task_type is None:
        warnings.warn(
            f"TAPS found no classifier head in {type(model).__name__} (a timm head, `classifier`, `head`, `heads`, "
            "`fc` or `score`): nothing is trained in full. If the model has a head, name it: "
            "TAPSConfig(modules_to_save=['my_head']).", UserWarning, stacklevel=7,
        )
    requested = config.target_modules
    if requested is None:
        config.target_modules = set(default_targets(model, head))
    else:
        check_targets(model, requested)
    check_modules_to_save(model, config.modules_to_save, config.task_type)
    if config.train_norms:
        saved = list(config.modules_to_save or [])
        config.modules_to_save = saved + [n for n in norm_modules(model, skip=saved) if n not in saved]
    planned_targets(model, config, requested)
    return head
