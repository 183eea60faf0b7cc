"""Which modules TAPS gates, trains in full (head) or copies per task (norms), found by looking at the model."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from .layer import SUPPORTED_LAYERS

# A ViT's patch embedding is not gated (paper: ViT-S/16 has L = 48 = 12 blocks x {qkv, proj, fc1, fc2}).
_PATCH_EMBED_NAMES = ("patch_embed", "patch_embeddings")
_HEAD_ATTRS = ("classifier", "head", "fc")
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

    Example:
        >>> find_head(timm.create_model("resnet18", pretrained=False))  # doctest: +SKIP
        'fc'
    """
    modules = plain_modules(model)
    timm_head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    candidates = [timm_head] if isinstance(timm_head, str) else []
    for name in candidates + list(_HEAD_ATTRS):
        module = modules.get(name)
        if module is not None and any(p.numel() for p in module.parameters()):
            return name
    return None


def default_targets(model: nn.Module, head: Optional[str]) -> list[str]:
    """Full names of every Linear/Conv except the head and a patch embedding (the layers the paper gates)."""
    names = [
        name
        for name, module in plain_modules(model).items()
        if isinstance(module, SUPPORTED_LAYERS)
        and not _is_under(name, head)
        and not any(part in _PATCH_EMBED_NAMES for part in name.split("."))
    ]
    if not names:
        raise ValueError(
            f"TAPS found no layer to gate in {type(model).__name__}: it gates {[t.__name__ for t in SUPPORTED_LAYERS]} "
            "outside the head and patch embedding. Pass `target_modules=[...]` naming the layers to adapt."
        )
    return names


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
            f"Gateable layers include {gateable[:8]}{' ...' if len(gateable) > 8 else ''}; "
            "fix the names, or pass target_modules=None for the default layers. (Loading a saved adapter? It does "
            "not fit this base model: load it onto the base it was trained from.)"
        )


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
