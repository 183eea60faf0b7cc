"""What an adapter records about its base model (``TAPSConfig.base_model_info``), and the check made when loading.

Recorded at every save: the library, the architecture, the name as the user gave it (``base_model_name_or_path``),
whether pretrained weights were loaded (when known: a transformers checkpoint, or what the training script says),
the number of classes, and a fingerprint of the gated base weights. A script that knows more sets ``name`` (e.g.
``timm/resnet50.a1_in1k``: PEFT's ``get_peft_model`` resets ``base_model_name_or_path`` from the model, and timm
models have none) and ``pretrained``. A script that builds the base can add how
(``seed``, ``model_kwargs``, ``weights``): the model card then shows code that rebuilds exactly that base.

The fingerprint: 8 random projections of up to 4096 evenly spaced elements of every gated weight, normalised. Two
different bases (another seed, another checkpoint) differ by about 1 in each; the same base in another dtype (bf16)
differs by about 1e-3. Cheap: a few thousand elements per layer.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any, Iterable, Optional

import torch
from torch import nn

_SAMPLES, _PROJECTIONS, _TOLERANCE = 4096, 8, 0.05


class BaseModelMismatchWarning(UserWarning):
    """An adapter is loaded onto a base whose weights differ from the base it was trained on (same shapes).

    Make it an error with ``PeftModel.from_pretrained(..., strict_base=True)`` (also ``load_adapter``) or
    ``warnings.filterwarnings("error", category=BaseModelMismatchWarning)``.
    """


def fingerprint(model: nn.Module, layers: Iterable[str]) -> Optional[list[float]]:
    """The fingerprint of the base weights of the gated ``layers`` (module names) of ``model``, as they are without
    any adapter (merged weights are looked through); None when they are sharded (FSDP2) or on the meta device. Each
    layer's projections are seeded by its name, so an adapter's fingerprint depends on its own layers only."""
    from ..tuner.layer import TAPSLayer, _is_sharded

    base = _base(model)
    modules = dict(base.named_modules())
    projections = torch.zeros(_PROJECTIONS, dtype=torch.float64)
    square = 0.0
    for name in sorted(layers):
        module = modules[name]
        if isinstance(module, TAPSLayer):
            weight = module._unmerged_weight if module._unmerged_weight is not None else module.get_base_layer().weight
        else:
            weight = module.weight
        if _is_sharded(weight) or weight.device.type == "meta":
            return None
        flat = weight.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _SAMPLES)).long().to(flat.device)
        values = flat[index].double().cpu()
        seed = zlib.crc32(name.encode())
        signs = torch.randint(0, 2, (_PROJECTIONS, len(values)), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        projections += signs.double() @ values
        square += float(values.square().sum())
    if square == 0:
        return None
    return [round(v, 4) for v in (projections / square**0.5).tolist()]


def adapter_layers(model: nn.Module, adapter_name: str) -> list[str]:
    """Names (in the base model) of the layers that hold ``adapter_name``'s score."""
    from ..tuner.layer import TAPSLayer

    base = _base(model)
    return [n for n, m in base.named_modules() if isinstance(m, TAPSLayer) and adapter_name in m.taps_scores]


def base_identity(model: nn.Module, config: Any, adapter_name: Optional[str] = None) -> dict[str, Any]:
    """``config.base_model_info`` brought up to date for ``model`` (a TAPS ``PeftModel``) and one of its adapters: what
    a script recorded (``pretrained``, ``seed``, ``model_kwargs``, ``weights``) is kept, the rest is read off the
    model (the fingerprint covers that adapter's layers; none without an adapter name)."""
    from ..tuner.targets import find_head

    base = _base(model)
    info = dict(getattr(config, "base_model_info", None) or {})
    user_name = info.get("name")  # as a script or an earlier save recorded it
    pcfg = getattr(base, "pretrained_cfg", None)
    hf_config = getattr(base, "config", None)
    if isinstance(pcfg, dict) and type(base).__module__.startswith("timm.") and pcfg.get("architecture"):
        info.update(library="timm", architecture=pcfg["architecture"])
        tag = pcfg.get("tag") if info.get("pretrained") else None
        info["name"] = user_name or pcfg["architecture"] + (f".{tag}" if tag else "")
        info["default_args"] = _timm_default_args(base, pcfg["architecture"])
    elif hasattr(hf_config, "model_type") and hasattr(hf_config, "to_dict"):
        checkpoint = getattr(hf_config, "_name_or_path", "") or None
        info.update(library="transformers", architecture=type(base).__name__, model_type=hf_config.model_type)
        info["name"] = getattr(config, "base_model_name_or_path", None) or checkpoint or user_name or type(base).__name__
        info.setdefault("pretrained", checkpoint is not None)
    else:
        info.update(library="torch", architecture=type(base).__name__)
        info["name"] = user_name or type(base).__name__
    head = find_head(base)
    if head is not None:
        module = _plain(base.get_submodule(head))
        out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        if out is not None:
            info["num_classes"] = int(out)
    info.setdefault("pretrained", None)
    info["fingerprint"] = fingerprint(model, adapter_layers(model, adapter_name)) if adapter_name else None
    return info


def check_base(model: nn.Module, config: Any, adapter_name: str, strict: bool = False) -> None:
    """Warn (``strict``: raise) when ``model``'s base has other weights than the one the adapter was trained on."""
    from ..tuner.targets import planned_targets

    saved = getattr(config, "base_model_info", None) or {}
    if not saved.get("fingerprint"):
        return
    base = _base(model)
    now = fingerprint(model, planned_targets(base, config, config.target_modules))
    if now is None or max(abs(a - b) for a, b in zip(saved["fingerprint"], now)) <= _TOLERANCE:
        return
    here = base_identity(model, None)["name"]
    this = f"this base is also `{here}` but" if here == saved.get("name") else f"this base (`{here}`)"
    message = (
        f"TAPS adapter '{adapter_name}' was trained on the base `{saved.get('name')}`, and {this} has the same layer "
        "shapes but other weights (another seed or checkpoint: the fingerprints differ), so the adapter's outputs "
        "will be wrong. "
        "Load it onto the base it was trained on (its README shows how to build it)"
        + ("." if strict else "; pass strict_base=True to make this an error.")
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, BaseModelMismatchWarning, stacklevel=3)


def _base(model: nn.Module) -> nn.Module:
    """The base model of a ``PeftModel`` (``model`` itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain(module: nn.Module) -> nn.Module:
    return getattr(module, "original_module", module)


def _timm_default_args(base: nn.Module, architecture: str) -> bool:
    """Whether ``base`` has the shapes of ``timm.create_model(architecture)`` (head aside): False when it was built
    with other arguments (img_size, depth, ...) that a card could not guess."""
    import timm

    try:
        with torch.device("meta"):
            default = timm.create_model(architecture, pretrained=False, num_classes=getattr(base, "num_classes", 1000))
    except Exception:  # an architecture timm cannot build by name
        return False
    mine = {k.replace(".base_layer", "").replace(".original_module", ""): tuple(v.shape)
            for k, v in base.state_dict().items() if ".taps_" not in k and ".modules_to_save." not in k}
    return {k: tuple(v.shape) for k, v in default.state_dict().items()} == mine
