"""Export a TAPS adapter as a plain PEFT LoRA adapter, for runtimes that only speak LoRA."""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Optional, Union

import torch
from torch import nn

from ..tuner.layer import _CONV
from ..tuner.saved import tensors_digest
from .card import save_export_card


def export_lora(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    rank: Optional[Union[int, float]] = None,
    adapter_name: Optional[str] = None,
) -> dict[str, Any]:
    """Write one adapter of a TAPS ``PeftModel`` as a plain PEFT LoRA adapter that loads with
    ``PeftModel.from_pretrained`` in a process that never imports taps_peft.

    Only the active layers become LoRA layers, each with its own rank (``rank_pattern``, with ``alpha_pattern`` set so
    that every scaling is 1, keys anchored to the whole module name): the SVD of its delta,
    ``W_base + dW = W_base + B @ A``. ``rank=None`` keeps every non-negligible singular value (exact up to float
    rounding), an int caps each layer's rank, a float in (0, 1) keeps the smallest rank holding that fraction of the
    delta's energy (the sum of squared singular values). A low-rank TAPS delta (``TAPSConfig(r=...)``) is exported as
    its own factors, at rank r with the scaling folded into B (no SVD), unless ``rank`` asks for less. The head and
    norms go in as ``modules_to_save``, and so do active layers that LoRA cannot represent exactly (grouped or dilated
    convs, timm's ``StdConv2d`` / ``Conv2dSame``, other subclasses) or whose factors would be larger than the delta
    itself: those are saved whole, with ``W_base + dW`` as their weight.

    Returns what was written: ``lora_layers`` (name -> rank), ``saved_whole`` (layer names) and ``bytes``.

    Example:
        >>> export_lora(model, "runs/flowers-lora")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base, "runs/flowers-lora")  # no taps_peft needed  # doctest: +SKIP
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    adapter_name = adapter_name or model.active_adapters[0]
    if rank is not None and not ((isinstance(rank, int) and rank > 0) or (isinstance(rank, float) and 0 < rank < 1)):
        raise ValueError(f"export_lora(rank={rank!r}) is invalid: use None (exact), an int > 0 or a float in (0, 1).")
    work = copy.deepcopy(model)
    if any(layer.merged for _, layer in work.base_model.taps_layers()):
        work.unmerge_adapter()
    work.set_adapter(adapter_name)
    config = work.peft_config[adapter_name]
    names = [n for n, _ in work.get_base_model().named_modules() if n]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    whole: list[str] = []
    for name, layer in work.base_model.taps_layers():
        if not layer.has_delta(adapter_name) or not layer.is_active(adapter_name):
            continue
        base = layer.get_base_layer()
        with torch.no_grad():
            delta = layer.delta(adapter_name).detach()
        r = layer.taps_rank.get(adapter_name)
        if not _lora_exact(base):
            factor = None
        elif r is not None and (rank is None or (isinstance(rank, int) and rank >= r)):  # exact, no SVD
            factor = (layer.taps_A[adapter_name].detach().float(),
                      layer.taps_B[adapter_name].detach().float() * layer.taps_scaling[adapter_name])
        else:
            factor = _factor(delta.float().reshape(delta.shape[0], -1), rank)
        # PEFT wraps every module whose name ends with a modules_to_save entry: a layer whose name ends another's
        # (a stem ``conv1`` and ``layer2.0.conv1``) can only be a LoRA layer
        ambiguous = any(n != name and n.endswith(name) for n in names)
        if factor is not None and (ambiguous or factor[0].numel() + factor[1].numel() < delta.numel()):
            factors[name] = factor
        elif ambiguous:
            raise ValueError(
                f"export_lora: the active layer `{name}` ({type(base).__name__}) is one LoRA cannot hold exactly, and "
                "PEFT cannot save it whole either: modules_to_save would also take every module whose name ends with "
                f"'{name}'. Share the TAPS adapter (save_pretrained) instead."
            )
        else:
            whole.append(name)
            with torch.no_grad():
                base.weight.add_(delta.to(base.weight.dtype))
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    if not ranks:  # PEFT's LoRA needs at least one target
        raise ValueError(
            f"export_lora: adapter '{adapter_name}' has no active layer that LoRA can hold ({len(whole)} would be saved "
            "whole): there is nothing to export as LoRA; share the TAPS adapter (save_pretrained) instead."
        )
    # PEFT matches a pattern key at the end of a module name after any prefix (``(.*\.)?KEY$``): "(?<!.)" keeps a key
    # from matching a longer name, so the stem's ``conv1`` does not also match ``layer2.0.conv1``.
    pattern = {f"(?<!.){re.escape(name)}": r for name, r in ranks.items()}
    lora_config = LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), rank_pattern=pattern,
        target_modules="|".join(re.escape(n) for n in sorted(ranks)),  # a string is fullmatched: exactly these
        alpha_pattern=pattern, modules_to_save=list(config.modules_to_save or []) + whole, init_lora_weights=False,
    )
    plain = work.unload()  # gated layers: the base layers; head and norms: this adapter's copies
    lora = get_peft_model(plain, lora_config)
    for name, (a, b) in factors.items():
        layer = lora.base_model.model.get_submodule(name)
        weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            weight_a.copy_(a.reshape(weight_a.shape).to(weight_a))
            weight_b.copy_(b.reshape(weight_b.shape).to(weight_b))
    lora.save_pretrained(str(save_directory))
    size = os.path.getsize(os.path.join(save_directory, "adapter_model.safetensors"))
    source = tensors_digest(get_peft_model_state_dict(model, adapter_name=adapter_name).values())
    save_export_card(model, adapter_name, save_directory, ranks, whole, source)
    return {"lora_layers": ranks, "saved_whole": whole, "bytes": size}


def _lora_exact(layer: nn.Module) -> bool:
    """Whether PEFT's LoRA layer computes ``base(x) + x @ (B A)^T`` for this layer exactly (plain Linear, or a plain
    conv without groups, dilation or another padding mode)."""
    if type(layer) is nn.Linear:
        return True
    return (
        type(layer) in _CONV and layer.groups == 1 and all(d == 1 for d in layer.dilation)
        and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    )


def _factor(delta: torch.Tensor, rank: Optional[Union[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r, n) and ``B`` (m, r) with ``B @ A ~ delta`` (m, n), by SVD; ``rank`` as in :func:`export_lora`."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = int((s > s[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum()) if s.numel() and s[0] > 0 else 1
    if isinstance(rank, int):
        keep = min(keep, rank)
    elif isinstance(rank, float):
        energy = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-30)
        keep = min(keep, int((energy < rank).sum()) + 1)
    keep = max(keep, 1)
    root = s[:keep].sqrt()
    return (root[:, None] * vh[:keep]).float(), (u[:, :keep] * root).float()
