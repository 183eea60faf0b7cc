"""Optimizer parameter groups for TAPS: scores get their own learning rate and no weight decay."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def create_taps_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-3,
    score_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters, with the TAPS scores in a group of their own.

    Adam-type optimizers move a score by about ``lr`` per step, so a small ``lr`` would take thousands of steps to
    bring a score from 0.15 below tau = 0.1: give scores a larger ``score_lr`` (e.g. 1e-2). Scores never get weight
    decay (the TAPS penalty already regularises them).

    Example:
        >>> opt = create_taps_optimizer(model, torch.optim.AdamW, lr=1e-4, score_lr=1e-2)  # doctest: +SKIP
    """
    scores, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (scores if ".taps_scores." in f".{name}." else others).append(param)
    if not scores:
        raise ValueError("create_taps_optimizer found no trainable TAPS score: pass a model from get_peft_model(...).")
    groups = [
        {"params": others, "lr": lr, "weight_decay": weight_decay},
        {"params": scores, "lr": lr if score_lr is None else score_lr, "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=lr, **optimizer_kwargs)
