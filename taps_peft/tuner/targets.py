"""Which modules TAPS gates, trains in full (head) or copies per task (norms), found by looking at the model."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
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


def check_saved_adapter(model: nn.Module, config, saved: dict[str, tuple]) -> None:
    """Check a saved adapter's tensor names and shapes (``saved``) against the layers ``config`` gates in ``model``
    and its ``modules_to_save``, before anything is loaded. Every gated layer needs its score; deltas, head and norms
    need the model's shapes; the file may hold nothing else (no base weight, no layer the adapter does not declare)."""
    modules = plain_modules(model)
    targets = planned_targets(model, config, config.target_modules)
    shapes = {k.removeprefix("base_model.model."): tuple(v) for k, v in saved.items()}
    problems: list[str] = []
    allowed: set[str] = set()
    for name in targets:
        weight = tuple(modules[name].weight.shape)
        allowed |= {f"{name}.taps_scores", f"{name}.taps_delta"}
        if shapes.get(f"{name}.taps_scores") != (1,):
            problems.append(f"the file has no score for the layer `{name}`")
        delta = shapes.get(f"{name}.taps_delta")
        if delta is not None and delta != weight:
            problems.append(f"the delta for `{name}` has shape {delta} but the layer's weight has shape {weight}")
    for found in saved_modules(model, config.modules_to_save).values():
        for name in found:
            for key, tensor in modules[name].state_dict().items():
                allowed.add(f"{name}.{key}")
                got = shapes.get(f"{name}.{key}")
                if got is None:
                    problems.append(f"the file has no `{name}.{key}`")
                elif got != tuple(tensor.shape):
                    problems.append(f"`{name}.{key}` has shape {got} in the file but {tuple(tensor.shape)} here")
    stray = sorted(set(shapes) - allowed)
    layers = [k for k in stray if k.endswith((".taps_delta", ".taps_scores"))]
    problems += [f"the saved layer `{k}` has no matching module" for k in dict.fromkeys(k.rpartition(".")[0] for k in layers)]
    others = [k for k in stray if k not in layers]
    if others:
        problems.append(
            f"{len(others)} tensor(s) belong to no layer or module the adapter declares (e.g. `{others[0]}`): an "
            "adapter may hold only the deltas and scores of its target_modules and its modules_to_save"
        )
    if problems:
        raise ValueError(
            f"The TAPS adapter does not fit this base model ({type(model).__name__}): {len(problems)} problem(s): "
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Load the adapter onto the base model "
            "it was trained from (same architecture and number of classes; its README shows how to build it)."
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
