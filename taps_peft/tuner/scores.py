"""How the scores learn: the paper's penalty and a step size of their own, applied by TAPS at every optimizer step.

At each step of a ``torch.optim.Optimizer`` that holds a TAPS adapter's scores (any loop: the stock 🤗 ``Trainer``,
Accelerate, a plain loop), just before the optimizer updates anything, TAPS

1. adds the gradient of ``(lam_t / L) * sum_i |s_i|`` to the scores' gradients (so the penalty is never in the loss:
   gradient accumulation, a ``GradScaler``, DDP and FSDP have already turned the task gradients into the mean
   gradient of one optimizer step, and the penalty is added once, in those units), with ``lam_t`` ramped from 0 over
   the first ``TAPSConfig.lam_warmup`` of ``TAPSConfig.total_step`` steps;
2. moves the scores with Adam at ``TAPSConfig.score_lr`` (times the ratio of the optimizer's learning rate to its
   initial one, so the loop's schedule applies), its state kept in the optimizer's own state in Adam's layout
   (``step``, ``exp_avg``, ``exp_avg_sq``: checkpointed and resumed with the optimizer);
3. sets the scores' gradients to None, so the optimizer leaves them alone whatever its kind and learning rate.

This is torch's optimizer-step pre-hook, registered while a ``TAPSModel`` exists (and removed with the last one); an
optimizer that holds no TAPS score is not touched. Budgets (``budget_layers`` / ``budget_mib``) move ``lam`` here too,
once per optimizer step.

Example:
    >>> model = get_peft_model(vit, TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # any optimizer, any lr  # doctest: +SKIP
    >>> F.cross_entropy(model(x), y).backward(); optimizer.step()  # the scores learn, the penalty acts  # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, MutableMapping, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .model import TAPSModel

BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's defaults, as the scores had them in AdamW
_models: "weakref.WeakSet[TAPSModel]" = weakref.WeakSet()
_hook: Optional[torch.utils.hooks.RemovableHandle] = None
_live = 0


def track(model: TAPSModel) -> None:
    """Let the optimizer-step hook see ``model`` (called when a ``TAPSModel`` is created or unpickled); the hook is
    registered with the first model and removed when the last one is collected."""
    global _hook, _live
    if model in _models:
        return
    _models.add(model)
    _live += 1
    weakref.finalize(model, _untrack)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_before_optimizer_step)


def _untrack() -> None:
    global _hook, _live
    _live -= 1
    if _live == 0 and _hook is not None:
        _hook.remove()
        _hook = None


def hook_installed() -> bool:
    """Whether the optimizer-step hook is registered now (while a ``TAPSModel`` exists)."""
    return _hook is not None


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for model in list(_models):
        step_scores(model, optimizer)


def lam_at(config: Any, step: int) -> float:
    """``lam`` after ``step`` optimizer steps: ramped linearly from 0 over the first ``lam_warmup * total_step`` steps
    (all of ``lam`` without a warm-up, or while ``total_step`` is unknown)."""
    if not config.lam_warmup or not config.total_step:
        return config.lam
    return config.lam * min(1.0, step / (config.lam_warmup * config.total_step))


def step_scores(model: TAPSModel, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Apply the penalty and the Adam step to every score of ``model`` that has a gradient, then clear those
    gradients; returns how many scores moved. Runs by itself before each step of a ``torch.optim.Optimizer`` (for the
    scores that optimizer holds); call it yourself just before the step of an optimizer of another kind (its state
    then lives on the model).

    Example:
        >>> taps_peft.step_scores(model)  # doctest: +SKIP
        >>> deepspeed_engine.step()  # doctest: +SKIP
    """
    from ..budget import adapt_lam

    # only adapters trained in this step (not frozen gates, not an idle task of joint training)
    training = {a: s for a, s in model.scores_by_adapter().items() if any(p.grad is not None for p in s)}
    if not training:
        return 0
    held = None if optimizer is None else {id(p): g for g in optimizer.param_groups for p in g["params"]}
    state: MutableMapping = model.score_state if optimizer is None else optimizer.state
    moved = 0
    for adapter, scores in training.items():
        trainable = [p for p in scores if p.requires_grad and (held is None or id(p) in held)]
        if not any(p.grad is not None for p in trainable):
            continue  # held by another optimizer
        config = model.peft_config[adapter]
        adapt_lam(model, adapter)  # a budget moves lam once per step (nothing without one)
        step = _steps_done(state[trainable[0]])
        model.note_score_step(adapter, step + 1)
        group = None if held is None else held[id(trainable[0])]
        _adam(trainable, state, lam_at(config, step) / len(scores), config.score_lr * _schedule_ratio(group))
        moved += len(trainable)
    return moved


def _steps_done(entry: dict) -> int:
    """The Adam steps a score has taken: ``step`` in its state, a Python int (torch's Adam turns it into a tensor
    when it loads a state dict: read once then, and an int again from the next step on)."""
    step = entry.get("step", 0)
    return int(step) if torch.is_tensor(step) else step


def _schedule_ratio(group: Optional[dict]) -> float:
    """The optimizer's learning rate now over its initial one (a scheduler's ``initial_lr``; 1 without one)."""
    if group is None:
        return 1.0
    lr, initial = float(group["lr"]), float(group.get("initial_lr", group["lr"]))
    return lr / initial if initial > 0 else 0.0


@torch.no_grad()
def _adam(params: list[torch.Tensor], state: MutableMapping, penalty: float, lr: float) -> None:
    """Adam (torch's formula, no weight decay) on ``grad + penalty * sign(s)``; a score without a gradient in this
    step counts as 0 plus the penalty. The gradients are set to None after."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if penalty:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=penalty)
    entries = [state[p] for p in params]
    for e, p in zip(entries, params):  # Adam's own state layout, so torch's optimizers load it as theirs
        if "exp_avg" not in e:
            e.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    m, v = [e["exp_avg"] for e in entries], [e["exp_avg_sq"] for e in entries]
    steps = [_steps_done(e) + 1 for e in entries]
    for e, t in zip(entries, steps):
        e["step"] = t
    b1, b2 = BETAS
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1 - b2 ** t) for t in steps])
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - b1 ** t) for t in steps])
    for p in params:
        p.grad = None
