"""How the scores learn: the paper's penalty in the loss, and a step size of their own at every optimizer step.

1. **The penalty** ``(lam_t / L) * sum_i |s_i|`` (``model.taps_penalty()``; ``lam_t`` is ``lam`` ramped from 0 over the
   first ``TAPSConfig.lam_warmup`` of ``TAPSConfig.total_step`` steps) goes into the loss, so whatever a loop does to
   its loss and gradients (gradient accumulation, a ``GradScaler``, clipping, DDP/FSDP averaging) it does to the
   penalty too. A model that computes its own loss (a transformers model given ``labels``) gets it added to
   ``outputs.loss`` in training, as models add their auxiliary losses, with the loss's own normalisation (its share
   of ``num_items_in_batch`` when the Trainer passes it): the stock ``Trainer`` needs no TAPS code. A loop that
   computes the loss itself adds one line, ``loss = loss + model.taps_penalty()``.
2. **The score step.** At each step of a ``torch.optim.Optimizer`` that holds the scores, just before it updates
   anything, TAPS moves them with Adam at ``TAPSConfig.score_lr`` (times the ratio of the optimizer's learning rate to
   its initial one, so the loop's schedule applies) and sets their gradients to None, so the optimizer's kind and
   learning rate do not set their step; the Adam state is kept in the optimizer's own state, in Adam's layout
   (checkpointed and resumed with it). A step whose loss lacked the penalty gets its gradient added there, with a
   warning that names the line to add. Budgets (``budget_layers`` / ``budget_mib``) move ``lam`` here too, once per
   optimizer step.

The step runs from torch's optimizer-step pre-hook, registered while a ``TAPSModel`` exists (and removed with the last
one); an optimizer that holds no TAPS score is not touched.

Example:
    >>> model = get_peft_model(vit, TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # any optimizer, any lr  # doctest: +SKIP
    >>> loss = F.cross_entropy(model(x), y) + model.taps_penalty()  # doctest: +SKIP
    >>> loss.backward(); optimizer.step()  # the penalty acts, the scores step at score_lr  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, MutableMapping, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .tuner.model import TAPSModel

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


def gates_fixed(config: Any, step: int) -> bool:
    """Whether the gates are fixed after ``step`` optimizer steps: ``freeze_gates_at`` of a known training length."""
    return bool(config.freeze_gates_at is not None and config.total_step
                and step >= config.freeze_gates_at * config.total_step)


class _Backpropagated(torch.autograd.Function):
    """The identity on the penalty's value; its backward tells the model that the penalty reached this step's
    gradients (a host-side note: no device read)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, note: Callable[[], None]) -> torch.Tensor:
        ctx.note = note
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.note()
        return grad, None


@torch.compiler.disable  # lam changes every step: kept out of compiled graphs (no recompile)
def penalty(model: TAPSModel) -> torch.Tensor:
    """``(lam_t / L) * sum_i |s_i|`` over the model's active adapters (``model.taps_penalty()``)."""
    from .tuner.layer import full_tensor

    total, adapters = None, []
    by_adapter = model.scores_by_adapter()
    for name in model.active_adapters:
        found = by_adapter.get(name)
        if not found:
            continue
        lam = lam_at(model.peft_config[name], model._score_steps.get(name, 0))
        term = torch.cat([full_tensor(s).reshape(1) for s in found]).abs().sum() * (lam / len(found))
        total = term if total is None else total + term
        adapters.append(name)
    if total is None:
        return torch.zeros((), device=next(iter(model.model.parameters())).device)
    if total.requires_grad:
        total = _Backpropagated.apply(total, partial(model._penalized.update, adapters))
    return total


class LossHook:
    """Forward hook on the wrapped model: in training, a loss the model computed (``outputs.loss``, or the first element
    of a tuple when ``labels`` were given) gets the penalty, as its share of ``num_items_in_batch`` when the loss is
    normalised by it (the Trainer's gradient accumulation), else whole (a mean over this batch). It holds its
    ``TAPSModel`` weakly, and a copy or an unpickled model binds a new one (``bind_loss_hook``)."""

    def __init__(self, model: Optional[TAPSModel]) -> None:
        self.model = None if model is None else weakref.ref(model)

    def __reduce__(self):  # no weak reference in a pickle: the unpickled TAPSModel binds its own
        return (LossHook, (None,))

    def __deepcopy__(self, memo: dict) -> "LossHook":
        return LossHook(None)

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        model = None if self.model is None else self.model()
        if model is None or not (module.training and torch.is_grad_enabled()):
            return output
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif isinstance(output, tuple) and output and kwargs.get("labels") is not None:
            loss = output[0]
        else:
            return output
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            return output
        value = penalty(model)
        items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if items is not None and isinstance(labels, torch.Tensor):
            value = value * (labels != -100).sum().to(value.dtype) / torch.as_tensor(items, device=value.device)
        loss = loss + value.to(loss.device, loss.dtype)
        model._penalty_in_output = True
        if isinstance(output, Mapping):
            output["loss"] = loss
            return output
        return (loss, *output[1:])


def bind_loss_hook(model: TAPSModel) -> None:
    """Give the wrapped model one ``LossHook`` bound to ``model`` (a copied or unpickled one is replaced)."""
    remove_loss_hook(model.model, recurse=False)
    model.model.register_forward_hook(LossHook(model), with_kwargs=True)


def remove_loss_hook(module: torch.nn.Module, recurse: bool = True) -> None:
    """Take every ``LossHook`` off ``module`` (and its children): an unloaded model is a plain model."""
    for m in module.modules() if recurse else [module]:
        for key in [k for k, h in m._forward_hooks.items() if isinstance(h, LossHook)]:
            for hooks in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called):
                hooks.pop(key, None)


def step_scores(model: TAPSModel, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Apply the penalty and the Adam step to every score of ``model`` that has a gradient, then clear those
    gradients; returns how many scores moved. Runs by itself before each step of a ``torch.optim.Optimizer`` (for the
    scores that optimizer holds); call it yourself just before the step of an optimizer of another kind (its state
    then lives on the model).

    Example:
        >>> taps_peft.step_scores(model)  # doctest: +SKIP
        >>> deepspeed_engine.step()  # doctest: +SKIP
    """
    from .budget import adapt_lam

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
        step = _steps_done(state[trainable[0]])
        missing = adapter not in model._penalized  # the loss of this step lacked the penalty: added here
        model._penalized.discard(adapter)
        model.note_score_step(adapter, step + 1)
        if gates_fixed(config, step):  # the rest of training keeps the gates as they are: the scores' grads go
            for p in trainable:
                p.grad = None
                state[p]["step"] = step + 1  # the count of optimizer steps goes on (note_score_step reads it)
            continue
        if missing:
            _warn_missing_penalty(model)
        group = None if held is None else held[id(trainable[0])]
        _adam(trainable, state, lam_at(config, step) / len(scores) if missing else 0.0,
              config.score_lr * _schedule_ratio(group))
        adapt_lam(model, adapter)  # a budget moves lam once per step, for the next one (nothing without one)
        moved += len(trainable)
    return moved


def _warn_missing_penalty(model: TAPSModel) -> None:
    if "missing-penalty" in model._warned:
        return
    model._warned.add("missing-penalty")
    warnings.warn(
        "TAPS: the loss of this optimizer step did not include the TAPS penalty (the model returns logits, or the "
        "loop computes its own loss), so TAPS added the penalty's gradient at the step, where gradient clipping and "
        "loss scaling do not reach it: under clipping (the Trainer clips to norm 1) the penalty then outweighs the "
        "task and closes almost every gate. Add it to your loss: loss = loss + model.taps_penalty() (for a loss "
        "normalised by num_items_in_batch, times this batch's items / num_items_in_batch).",
        stacklevel=4,
    )


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
def _adam(params: list[torch.Tensor], state: MutableMapping, added: float, lr: float) -> None:
    """Adam (torch's formula, no weight decay) on ``grad + added * sign(s)`` (``added``: the penalty's weight when the
    loss lacked it); a score without a gradient in this step counts as 0. The gradients are set to None after."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if added:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=added)
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


def check_step(model: TAPSModel, layers: list) -> None:
    """Warn once when an optimizer step moved this model's weights but not its trainable scores: the optimizer
    does not hold them, or is not a ``torch.optim.Optimizer`` (its step runs no hook). Host-side counters only."""
    watched = next((p for m in layers for a in m.active_adapters if a in m.taps_scores and
                    m.taps_scores[a].requires_grad for p in m.adapter_params(a)[:-1] if p.requires_grad), None)
    if watched is None:
        model._watch = None
        return
    now = (id(watched), watched._version, sum(model._score_steps.values()))
    before, model._watch = model._watch, now
    if before is None or before[0] != now[0] or before[1] == now[1] or before[2] != now[2]:
        return
    if "unseen-step" not in model._warned:
        model._warned.add("unseen-step")
        warnings.warn(
            "TAPS: an optimizer step updated the adapter's weights but not its scores, so the gates did not learn "
            "and the penalty did not act. Build the optimizer over all trainable parameters, scores included "
            "(e.g. torch.optim.AdamW(model.parameters(), lr=...)); with an optimizer that is not a "
            "torch.optim.Optimizer, call taps_peft.step_scores(model) just before its step.",
            stacklevel=4,
        )
