"""Export a TAPS adapter as a plain PEFT LoRA adapter, for runtimes that only speak LoRA: exact by default, every
layer's treatment reported, the output error measured against the TAPS model, nothing written unless it holds."""

from __future__ import annotations

import copy
import json
import numbers
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import temporary_name
from ..tuner.layer import _CONV
from ..trust.saves import WEIGHTS_NAME, adapter_digest, tensors_digest
from ..tuner.targets import saved_modules
from .card import save_export_card

_WRITES = ("adapter_config.json", WEIGHTS_NAME, "adapter_model.bin", "README.md")  # what an export (re)places
_ORDER = {WEIGHTS_NAME: 0, "adapter_config.json": 1}  # weights, then config, then the card


def export_lora(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    rank: Optional[Union[int, float]] = None,
    adapter_name: Optional[str] = None,
    *,
    example_inputs: Any = None,
    tolerance: Optional[float] = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write one adapter of a TAPS ``PeftModel`` as a plain PEFT LoRA adapter that loads with
    ``PeftModel.from_pretrained`` in a process that never imports taps_peft.

    Each active layer is one of (``layers`` in the result, printed with ``verbose``):

    - ``exact``: a LoRA layer with its delta's exact factors, ``W_base + dW = W_base + B @ A`` (each layer its own
      rank, ``rank_pattern`` with scaling 1): a low-rank TAPS delta (``TAPSConfig(r=...)``) as its own factors (no
      SVD), a full delta by its SVD at its numerical rank;
    - ``approximate``: a LoRA layer at a rank ``k`` below the delta's (``rank`` an int caps each layer's rank, a
      float in (0, 1) keeps the smallest rank holding that fraction of the delta's energy), with its relative error;
    - ``whole``: ``W_base + dW`` saved as the layer itself (``modules_to_save``), exact: layers LoRA cannot represent
      (grouped or dilated convs, timm's ``Conv2dSame`` / ``StdConv2d``, other subclasses) and layers whose factors
      would hold more numbers than the delta (a trained delta is often full rank).

    The head and norms go in as ``modules_to_save``. PEFT's LoRA needs one LoRA layer: when every active layer is
    saved whole, a closed or ungated layer carries a rank-1 LoRA of zeros (``zero``), else the smallest exact factors.

    The exported adapter is then loaded with plain PEFT into a copy of the base and run on ``example_inputs`` (a
    tensor, a tuple of positional inputs or a dict of keyword inputs; default: a random batch of 2 (seed 0) of the
    model's input size, from timm's ``pretrained_cfg`` / patch embedding or a transformers config's ``image_size``).
    Its largest output difference from the TAPS model, relative to the largest TAPS output, must be at most
    ``tolerance`` (default 1e-3, or 3e-2 for a 16-bit base): a larger one raises a ValueError naming the error and
    the fix, and nothing is written. ``save_directory`` must not hold an adapter or a README already (``overwrite``
    replaces them).

    Returns ``lora_layers`` (name -> rank), ``saved_whole`` (names), ``layers`` (per layer: ``action``, ``rank``,
    ``full_rank``, ``delta_error``, ``reason``), ``bytes``, ``error`` (largest absolute output difference),
    ``relative_error``, ``tolerance``, ``input`` (which input was used) and ``report`` (the text printed).

    Example:
        >>> export_lora(model, "runs/flowers-lora")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base, "runs/flowers-lora")  # no taps_peft needed  # doctest: +SKIP
    """
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    rank = _check_rank(rank)
    target = Path(save_directory)
    _check_target(target, overwrite)
    adapter_name = adapter_name or model.active_adapters[0]
    model.base_model._check_known(adapter_name, "export")
    work = copy.deepcopy(model)
    if any(layer.merged for _, layer in work.base_model.taps_layers()):
        work.unmerge_adapter()
    work.set_adapter(adapter_name)
    work.eval()
    dtype = next((p.dtype for p in work.get_base_model().parameters() if p.is_floating_point()), torch.float32)
    tolerance = _check_tolerance(tolerance, dtype)
    args, kwargs, described = example_batch(work.get_base_model(), example_inputs, dtype)
    with torch.no_grad():
        expected = _output(work(*args, **kwargs))
    config = work.peft_config[adapter_name]
    source = adapter_digest(tensors_digest(get_peft_model_state_dict(work, adapter_name=adapter_name).values()),
                            config)  # the TAPS save's weights_digest
    fresh = copy.deepcopy(work).unload()  # the base, for the plain-PEFT load that measures the export
    layers = _plan(work, adapter_name, rank, config)
    if not any(p["action"] != "whole" for p in layers.values()):
        _add_carrier(work, layers, config)
    for name, plan in layers.items():
        delta = plan.pop("delta", None)
        if plan["action"] == "whole":
            plan.pop("factors", None)
            base = work.base_model.model.get_submodule(name).get_base_layer()
            with torch.no_grad():
                base.weight.add_(delta.to(base.weight.dtype))
    lora_plans = {n: p for n, p in layers.items() if p["action"] != "whole"}
    ranks = {name: p["rank"] for name, p in lora_plans.items()}
    whole = [n for n, p in layers.items() if p["action"] == "whole"]
    # PEFT matches a pattern key at the end of a module name after any prefix (``(.*\.)?KEY$``): "(?<!.)" keeps a key
    # from matching a longer name, so the stem's ``conv1`` does not also match ``layer2.0.conv1``.
    pattern = {f"(?<!.){re.escape(name)}": r for name, r in ranks.items()}
    lora_config = LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), rank_pattern=pattern,
        target_modules="|".join(re.escape(n) for n in sorted(ranks)),  # a string is fullmatched: exactly these
        alpha_pattern=pattern, modules_to_save=list(config.modules_to_save or []) + whole, init_lora_weights=False,
    )
    lora = get_peft_model(work.unload(), lora_config)  # gated layers: the base layers; head, norms: the task's copies
    for name, plan in lora_plans.items():
        layer = lora.base_model.model.get_submodule(name)
        weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a, b = plan.pop("factors")
        with torch.no_grad():
            weight_a.copy_(a.reshape(weight_a.shape).to(weight_a))
            weight_b.copy_(b.reshape(weight_b.shape).to(weight_b))
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    stage = temporary_name(target / "export")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        lora.save_pretrained(str(stage))
        loaded = PeftModel.from_pretrained(fresh, str(stage)).eval()  # plain PEFT, as a user would load it
        with torch.no_grad():
            got = _output(loaded(*args, **kwargs))
        error = float((got.float() - expected.float()).abs().max())
        scale = max(float(expected.float().abs().max()), 1e-6)
        measured = (f"largest output difference {error:.3g} ({error / scale:.3g} of the largest output, {scale:.3g}) "
                    f"on {described}")
        report = _report(adapter_name, target, layers, measured, tolerance)
        if verbose:
            print(report)
        if not error / scale <= tolerance:
            raise ValueError(
                f"export_lora: the exported LoRA adapter differs from the TAPS adapter '{adapter_name}': {measured}, "
                f"over tolerance={tolerance:g}. {_fix(layers)} Nothing was written to '{target}'."
            )
        save_export_card(model, adapter_name, stage, ranks, whole, source, measured)
        size = os.path.getsize(stage / WEIGHTS_NAME)
        for src in sorted(stage.iterdir(), key=lambda p: _ORDER.get(p.name, 2)):
            os.replace(src, target / src.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    return {"lora_layers": ranks, "saved_whole": whole, "layers": layers, "bytes": size, "error": error,
            "relative_error": error / scale, "tolerance": tolerance, "input": described, "report": report}


def _check_rank(rank: Any) -> Optional[Union[int, float]]:
    """``rank`` as :func:`export_lora` takes it (an int, also numpy's; never a bool), or a ValueError."""
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and rank > 0:
        return int(rank)
    if rank is None or (isinstance(rank, float) and 0 < rank < 1):
        return rank
    raise ValueError(
            f"export_lora(rank={rank!r}) is invalid: use None (exact, the default), an int > 0 (each layer's largest "
            "rank) or a float in (0, 1) (the fraction of each delta's energy kept)."
    )


def _check_tolerance(tolerance: Optional[float], dtype: torch.dtype) -> float:
    if tolerance is None:
        return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"export_lora(tolerance={tolerance!r}) is invalid: use a float >= 0 (the largest output "
                         "difference allowed, relative to the largest output), or None for the default.")
    return float(tolerance)


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a file, and a folder that already holds an adapter or a README (a TAPS adapter's own folder, an earlier
    export) unless ``overwrite``: an export replaces nothing silently."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"export_lora: '{target}' is a file, not a folder. Choose another path.")
    held = [n for n in _WRITES if (target / n).exists()]
    if held and not overwrite:
        kind = "an adapter"
        try:
            kind = f"a {json.loads((target / 'adapter_config.json').read_text())['peft_type']} adapter"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise ValueError(
            f"export_lora: '{target}' already holds {kind} ({', '.join(held)}): exporting there would replace it. "
            "Export into a new or empty folder (or pass overwrite=True to replace those files)."
        )


def example_batch(base: nn.Module, example_inputs: Any, dtype: torch.dtype) -> tuple[tuple, dict, str]:
    """The positional and keyword inputs the export is measured on, and what they are, in words."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            args, kwargs = (), dict(example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            args, kwargs = tuple(example_inputs), {}
        else:
            args, kwargs = (example_inputs,), {}
        shapes = [tuple(t.shape) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
        return args, kwargs, f"the example_inputs given (shape {', '.join(map(str, shapes))})"
    size, source = _input_size(base)
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    described = f"a random batch (torch.randn, seed 0) of shape {tuple(x.shape)}, the input size of {source}"
    if hasattr(getattr(base, "config", None), "model_type"):
        return (), {"pixel_values": x}, described
    return (x,), {}, described


def _input_size(base: nn.Module) -> tuple[tuple[int, ...], str]:
    """(channels, height, width) of the model's input, from timm's patch embedding or ``pretrained_cfg``, or a
    transformers config; a ValueError asking for ``example_inputs`` when neither says."""
    patch = getattr(base, "patch_embed", None)
    pcfg = getattr(base, "pretrained_cfg", None)
    config = getattr(base, "config", None)
    if patch is not None and getattr(patch, "img_size", None) is not None and hasattr(patch, "proj"):
        return (patch.proj.in_channels, *patch.img_size), "timm's patch_embed.img_size"
    if isinstance(pcfg, dict) and len(pcfg.get("input_size") or ()) == 3:
        return tuple(pcfg["input_size"]), "timm's pretrained_cfg['input_size']"
    if getattr(config, "image_size", None) is not None and getattr(config, "num_channels", None) is not None:
        side = config.image_size
        side = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
        return (config.num_channels, *side), "the transformers config's num_channels and image_size"
    raise ValueError(
        f"export_lora measures the exported adapter's outputs against the TAPS model's, and cannot tell the input "
        f"size of {type(base).__name__} (no timm pretrained_cfg or transformers image config): pass example_inputs, "
        "e.g. example_inputs=torch.randn(2, 3, 224, 224) (a tuple for several inputs, a dict for keyword inputs)."
    )


def _output(out: Any) -> torch.Tensor:
    """The tensor a model returns: itself, its ``logits``, or the first tensor of a tuple or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    found = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if found is None:
        raise TypeError(f"export_lora: the model returned {type(out).__name__}, with no tensor to compare.")
    return found


def _plan(work: nn.Module, adapter_name: str, rank: Optional[Union[int, float]], config: Any) -> dict[str, dict]:
    """What each active layer becomes: LoRA factors (exact or approximate) or saved whole, with the reason."""
    names = [n for n, _ in work.get_base_model().named_modules() if n]
    plans: dict[str, dict] = {}
    for name, layer in work.base_model.taps_layers():
        if not layer.has_delta(adapter_name) or not layer.is_active(adapter_name):
            continue
        base = layer.get_base_layer()
        with torch.no_grad():
            delta = layer.delta(adapter_name).detach()
        # PEFT wraps every module whose name ends with a modules_to_save entry: a layer whose name ends another's
        # (a stem ``conv1`` and ``layer2.0.conv1``) can only be a LoRA layer
        ambiguous = any(n != name and n.endswith(name) for n in names)
        why_not = _why_lora_cannot(base)
        if why_not is not None:
            if ambiguous:
                raise ValueError(
                    f"export_lora: the active layer `{name}` ({type(base).__name__}) is one LoRA cannot hold exactly "
                    f"({why_not}), and PEFT cannot save it whole either: modules_to_save would also take every module "
                    f"whose name ends with '{name}'. Share the TAPS adapter (save_pretrained) instead."
                )
            plans[name] = {"action": "whole", "rank": None, "full_rank": None, "delta_error": 0.0,
                           "reason": why_not, "delta": delta}
            continue
        r = layer.taps_rank.get(adapter_name)
        if r is not None and (rank is None or (isinstance(rank, int) and rank >= r)):  # its own factors, no SVD
            a = layer.taps_A[adapter_name].detach().float()
            b = layer.taps_B[adapter_name].detach().float() * layer.taps_scaling[adapter_name]
            plan = {"action": "exact", "rank": r, "full_rank": r, "delta_error": 0.0, "factors": (a, b)}
        else:
            matrix = delta.double().reshape(delta.shape[0], -1)
            full, keep, lost = _ranks(torch.linalg.svdvals(matrix), rank)
            numel = keep * sum(matrix.shape)
            if numel >= delta.numel() and not ambiguous:  # the singular vectors are never needed
                plans[name] = {"action": "whole", "rank": None, "full_rank": full, "delta_error": 0.0, "delta": delta,
                               "reason": f"rank-{keep} factors would hold {numel:,} numbers, the delta "
                                         f"{delta.numel():,}"}
                continue
            plan = {"action": "exact" if keep == full else "approximate", "rank": keep, "full_rank": full,
                    "delta_error": lost, "factors": _factors(matrix, keep)}
        plans[name] = plan
    return plans


def _why_lora_cannot(layer: nn.Module) -> Optional[str]:
    """Why PEFT's LoRA layer cannot compute ``base(x) + x @ (B A)^T`` for this layer exactly, or None (a plain Linear,
    or a plain conv without groups, dilation or another padding mode)."""
    if type(layer) is nn.Linear:
        return None
    if type(layer) not in _CONV:
        return f"a {type(layer).__name__}, which LoRA runs as its base class"
    if layer.groups != 1:
        return f"a grouped conv (groups={layer.groups}), which LoRA cannot hold"
    if any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "a dilated conv, or one with padding other than zeros, which LoRA cannot hold"
    return None


def _ranks(s: torch.Tensor, rank: Optional[Union[int, float]]) -> tuple[int, int, float]:
    """From a delta's singular values: its numerical rank, the rank kept (``rank`` as in :func:`export_lora`) and the
    fraction of the delta (Frobenius norm) lost at that rank."""
    full = int((s > s[0] * max(s.numel(), 1) * torch.finfo(torch.float32).eps).sum()) if s.numel() and s[0] > 0 else 1
    keep = full
    if isinstance(rank, int):
        keep = min(keep, rank)
    elif isinstance(rank, float):
        energy = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-30)
        keep = min(keep, int((energy < rank).sum()) + 1)
    keep = max(keep, 1)
    lost = float(s[keep:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-30)) if keep < full else 0.0
    return full, keep, lost


def _factors(matrix: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (k, n) and ``B`` (m, k) with ``B @ A`` the best rank-``keep`` approximation of ``matrix`` (m, n)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:keep].sqrt()
    return (root[:, None] * vh[:keep]).float(), (u[:, :keep] * root).float()


def _add_carrier(work: nn.Module, plans: dict[str, dict], config: Any) -> None:
    """PEFT's LoRA needs a target: when every active layer is saved whole, a closed or ungated layer LoRA can hold
    (outside the head and norms) gets a rank-1 LoRA of zeros; else the active layer whose exact factors cost the
    fewest numbers beyond its delta becomes a LoRA layer."""
    base = work.get_base_model()
    saved = [n for names in saved_modules(base, config.modules_to_save).values() for n in names]
    layers = dict(work.base_model.taps_layers())
    free = []
    for name, module in base.named_modules():
        module = layers[name].get_base_layer() if name in layers else module
        if (name and name not in plans and not any(name == s or name.startswith(s + ".") for s in saved)
                and isinstance(module, (nn.Linear, *_CONV)) and _why_lora_cannot(module) is None
                and not any(name.startswith(n + ".") for n in layers)):
            free.append((module.weight.shape[0] + module.weight[0].numel(), name, module))
    if free:
        _, name, module = min(free)
        fan_in = module.weight[0].numel()
        zeros = (torch.zeros(1, fan_in), torch.zeros(module.weight.shape[0], 1))
        plans[name] = {"action": "zero", "rank": 1, "full_rank": 0, "delta_error": 0.0, "factors": zeros,
                       "reason": "a LoRA of zeros: PEFT's LoRA needs one LoRA layer, and every active layer is saved "
                                 "whole"}
        return
    exact = []  # (numbers beyond the delta, name) of each active layer LoRA can hold exactly
    for name, plan in plans.items():
        if plan["full_rank"] is not None and _why_lora_cannot(layers[name].get_base_layer()) is None:
            delta = plan["delta"]
            exact.append((plan["full_rank"] * (delta.shape[0] + delta[0].numel()) - delta.numel(), name))
    if not exact:
        raise ValueError(
            "export_lora: no layer of this model can be a LoRA layer (every active layer is one LoRA cannot hold, and "
            "no other Linear/Conv is free), and PEFT's LoRA needs one. Share the TAPS adapter (save_pretrained) "
            "instead."
        )
    _, name = min(exact)
    delta, full = plans[name]["delta"], plans[name]["full_rank"]
    plans[name] = {"action": "exact", "rank": full, "full_rank": full, "delta_error": 0.0,
                   "factors": _factors(delta.reshape(delta.shape[0], -1), full),
                   "reason": "PEFT's LoRA needs one LoRA layer: the cheapest exact factors"}


def _report(adapter_name: str, target: Path, plans: dict[str, dict], measured: str, tolerance: float) -> str:
    """What the export did, one line per layer, and the measured error."""
    lines = [f"export_lora: TAPS adapter '{adapter_name}' -> '{target}' ({len(plans)} layer(s))"]
    width = max((len(n) for n in plans), default=0)
    for name, p in plans.items():
        if p["action"] == "exact":
            what = f"exact, rank {p['rank']}"
        elif p["action"] == "approximate":
            what = f"approximated at rank {p['rank']} of {p['full_rank']} ({p['delta_error']:.1%} of the delta lost)"
        elif p["action"] == "zero":
            what = f"rank 1 of zeros ({p['reason']})"
        else:
            what = f"saved whole ({p['reason']})"
        lines.append(f"  {name:<{width}}  {what}")
    lines.append(f"measured: {measured}; tolerance {tolerance:g}")
    return "\n".join(lines)


def _fix(plans: dict[str, dict]) -> str:
    approximated = [n for n, p in plans.items() if p["action"] == "approximate"]
    if not approximated:
        return "No layer was approximated: report this as a bug (or pass a larger tolerance)."
    low = min(plans[n]["rank"] for n in approximated)
    return (f"{len(approximated)} layer(s) were approximated (e.g. `{approximated[0]}`, the lowest at rank {low}): "
            "export with a higher rank, or rank=None for an exact export (or pass a larger tolerance to accept it).")
