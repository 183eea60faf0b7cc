"""What a TAPS model has learned, read off its layers: the per-layer gate report, the summary (active layers k/L,
task-specific parameters, adapter bytes) and its printout, as ``print_trainable_parameters`` is for PEFT.

Example:
    >>> import taps_peft
    >>> taps_peft.print_taps_summary(model)  # doctest: +SKIP
    TAPS adapter 'default': active layers: 9/48 (18.8%) || task-specific params: ... || adapter size: 4.21 MiB
"""

from __future__ import annotations

from typing import Any, Optional

from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .tuner.layer import TAPSLayer, full_tensor
from .tuner.model import host_values, taps_layers, tuner_modules


def _adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    if adapter_name is not None:
        _config(model, adapter_name)  # an unknown name is refused, naming the loaded ones
        return adapter_name
    active = [a for _, m in taps_layers(model) for a in m.active_adapters]
    if not active:
        raise ValueError(f"{type(model).__name__} has no TAPS layer with an active adapter: pass a TAPS model.")
    return active[0]


def taps_layer_report(model: nn.Module, adapter_name: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per gated layer: ``name``, ``score``, ``active`` (score >= tau), ``params`` (delta size: the weight's,
    or ``r * (in + out)`` for low-rank factors) and ``bytes`` (the delta's bytes in the adapter file when active).
    All scores are read in one transfer. ``model`` is a TAPS ``PeftModel`` (or anything holding TAPS layers: a DDP
    wrapper, the tuner).

    Example:
        >>> [r["name"] for r in taps_layer_report(model) if r["active"]]  # doctest: +SKIP
        ['blocks.0.attn.qkv', 'blocks.3.mlp.fc1']
    """
    adapter_name = _adapter(model, adapter_name)
    layers = [(n, m) for n, m in taps_layers(model) if adapter_name in m.taps_scores]
    scores = host_values([full_tensor(m.taps_scores[adapter_name]) for _, m in layers])
    rows = []
    for (name, layer), score in zip(layers, scores):
        held = [p[adapter_name] for p in (layer.taps_delta, layer.taps_A) if adapter_name in p]
        size = (held[0] if held else layer.get_base_layer().weight).element_size()
        params = layer.delta_numel(adapter_name)
        rows.append({
            "name": name,
            "score": score,
            "active": score >= layer.taps_tau[adapter_name],
            "params": params,
            "bytes": params * size,
        })
    return rows


def taps_summary(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, Any]:
    """Active layers k/L, task-specific parameters (active deltas, scores, norms, head), adapter bytes and lam.

    Example:
        >>> taps_summary(model)["active_layers"]  # doctest: +SKIP
        9
    """
    adapter_name = _adapter(model, adapter_name)
    report = taps_layer_report(model, adapter_name)
    active = [r for r in report if r["active"]]
    saved = [
        t
        for m in tuner_modules(model)
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
        for t in m.modules_to_save[adapter_name].state_dict().values()
    ]
    saved_params = sum(t.numel() for t in saved if t.is_floating_point())
    task_params = sum(r["params"] for r in active) + len(report) + saved_params
    base_params = base_param_count(model)
    config = _config(model, adapter_name)
    budget = {k: v for k, v in (("layers", config.budget_layers), ("mib", config.budget_mib)) if v is not None}
    return {
        "adapter": adapter_name,
        "lam": config.lam,
        "budget": budget,
        "active_layers": len(active),
        "total_layers": len(report),
        "task_specific_params": task_params,
        "base_params": base_params,
        "task_specific_percent": 100.0 * task_params / max(base_params, 1),
        "adapter_bytes": sum(r["bytes"] for r in active) + 4 * len(report) + sum(t.nbytes for t in saved),
    }


def taps_training_plan(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """One line on what training will do: the gated layers and their deltas (full-size, or low-rank and how they are
    scaled), lam and its warm-up, the scores' learning rate. ``taps-peft train`` and ``TAPSCallback`` print it when
    training begins.

    Example:
        >>> print(taps_training_plan(model))  # doctest: +SKIP
        TAPS adapter 'default': 49 gated layers, low-rank deltas r=8 (48 factored, ...), lam 0.5 (ramped ...), score lr 0.01
    """
    adapter_name = _adapter(model, adapter_name)
    config = _config(model, adapter_name)
    layers = [m for _, m in taps_layers(model) if adapter_name in m.taps_scores]
    if config.r is None:
        deltas = "full-size deltas"
    else:
        scale = (f"alpha={config.alpha:g}" if config.alpha is not None
                 else "scaled per layer to train at full deltas' learning rate")
        factored = sum(adapter_name in m.taps_rank for m in layers)
        deltas = (f"low-rank deltas r={config.r}, {scale} ({factored} factored, {len(layers) - factored} full-size "
                  "where factors would not be smaller)")
    warmup = f"ramped from 0 over the first {config.lam_warmup:g} of training" if config.lam_warmup else "no warm-up"
    if config.lam_warmup and not config.total_step:
        warmup += " (training length unknown: set total_step)"
    return (f"TAPS adapter '{adapter_name}': {len(layers)} gated layers, {deltas}; lam {config.lam:g} ({warmup}); "
            f"score lr {config.score_lr:g}")


def print_taps_summary(model: nn.Module, adapter_name: Optional[str] = None, show_layers: bool = False) -> None:
    """Print the summary in one line (like PEFT's ``print_trainable_parameters``), optionally the per-layer table.

    Example:
        >>> print_taps_summary(model, show_layers=True)  # doctest: +SKIP
    """
    from .budget import budget_usage

    s = taps_summary(model, adapter_name)
    if show_layers:
        rows = taps_layer_report(model, s["adapter"])
        width = max([len(r["name"]) for r in rows] + [5])
        print(f"{'layer':<{width}}  {'score':>8}  active  {'params':>10}")
        for r in rows:
            print(f"{r['name']:<{width}}  {r['score']:>8.4f}  {'yes' if r['active'] else 'no':>6}  {r['params']:>10,}")
    pct = 100.0 * s["active_layers"] / max(s["total_layers"], 1)
    budget = ""
    if s["budget"]:
        used = budget_usage(model, s["adapter"])
        parts = [f"{used[k]:.3g}/{v:.3g} {k}" for k, v in s["budget"].items()]
        within = all(used[k] <= v for k, v in s["budget"].items())
        budget = f" || budget {', '.join(parts)} ({'within' if within else 'over'}, lam={s['lam']:.3g})"
    print(
        f"TAPS adapter '{s['adapter']}': active layers: {s['active_layers']}/{s['total_layers']} ({pct:.1f}%) || "
        f"task-specific params: {s['task_specific_params']:,} ({s['task_specific_percent']:.2f}% of base "
        f"{s['base_params']:,}) || adapter size: {s['adapter_bytes'] / 2**20:.2f} MiB{budget}"
    )


def _config(model: nn.Module, adapter_name: str) -> Any:
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and adapter_name in configs:
            return configs[adapter_name]
    loaded = [n for m in model.modules() if isinstance(getattr(m, "peft_config", None), dict) for n in m.peft_config]
    raise ValueError(f"No TAPS adapter named {adapter_name!r} in {type(model).__name__}: loaded adapters are "
                     f"{sorted(set(loaded))}.")


def base_param_count(model: nn.Module) -> int:
    """Parameters of the base model alone (no deltas, scores or per-adapter copies)."""
    extra = set()
    for m in tuner_modules(model):
        if isinstance(m, TAPSLayer):
            extra |= {id(p) for d in (m.taps_delta, m.taps_A, m.taps_B, m.taps_scores) for p in d.values()}
        elif isinstance(m, ModulesToSaveWrapper):
            extra |= {id(p) for p in m.modules_to_save.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in extra)
