"""Budgets: instead of a fixed ``lam``, at most ``budget_layers`` active layers or ``budget_mib`` MiB of active deltas
(``TAPSConfig``); :func:`adapt_lam` moves ``lam`` by dual ascent towards the budget. TAPS calls it itself once per
optimizer step, just before it applies the penalty (``taps_peft.scores``), in every training loop.

Example:
    >>> model = get_peft_model(vit, TAPSConfig(budget_layers=8))  # doctest: +SKIP
    >>> budget_usage(model)  # doctest: +SKIP
    {'layers': 8, 'mib': 3.4}
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .report import _adapter, _config, taps_layer_report


def budget_usage(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, float]:
    """The budgeted quantities now: ``layers`` (active layers) and ``mib`` (MiB of active deltas).

    Example:
        >>> budget_usage(model)  # doctest: +SKIP
        {'layers': 7, 'mib': 3.1}
    """
    rows = [r for r in taps_layer_report(model, adapter_name) if r["active"]]
    return {"layers": len(rows), "mib": sum(r["bytes"] for r in rows) / 2**20}


def adapt_lam(model: nn.Module, adapter_name: Optional[str] = None) -> Optional[float]:
    """One dual-ascent step on the adapter's ``lam`` for each budget it has (one host read of the gates): up while the
    active layers exceed the budget, down (to 0 at least) while they are within it. Returns the new ``lam`` (None
    without a budget: nothing is read or changed). TAPS calls it at every optimizer step (``taps_peft.scores``).

    Example:
        >>> adapt_lam(model)  # doctest: +SKIP
        0.55
    """
    adapter_name = _adapter(model, adapter_name)
    config = _config(model, adapter_name)
    budgets = {"layers": config.budget_layers, "mib": config.budget_mib}
    if all(b is None for b in budgets.values()):
        return None
    used = budget_usage(model, adapter_name)
    excess = max((used[k] - b) / max(b, 1e-9) for k, b in budgets.items() if b is not None)
    config.lam = max(0.0, config.lam + config.budget_rate * excess)
    return config.lam
