"""Joint multi-task TAPS (the paper's Eq. 4) and the memory-efficient shared-then-incremental variant.

``train_joint`` learns in one run a shared base plus, per task, a TAPS adapter (deltas, scores, norms, head) on one
PeftModel. A task's batch runs with its adapter (``set_adapter``) and adds its own penalty: summed over tasks, Eq. 4.
``schedule="round_robin"``: one optimizer step per task batch; ``"mixed"``: one step per round of K task batches.

Example:
    >>> model = train_joint(vit, {"cars": (x1, y1), "birds": (x2, y2)}, TAPSConfig(lam=0.2), steps=300,
    ...                     heads={"cars": nn.Linear(192, 196), "birds": nn.Linear(192, 200)})  # doctest: +SKIP
    >>> save_joint(model, "runs/joint")           # runs/joint/base/model.safetensors, runs/joint/cars/, ...
    >>> cars = load_joint(make_vit, "runs/joint", "cars")  # doctest: +SKIP

Under DDP (``accelerate launch``) each step uses one task's parameters only, so the default Accelerator is built with
``DistributedDataParallelKwargs(find_unused_parameters=True)``: DDP then leaves the other tasks' gradients at None,
and AdamW/SGD skip them. Handing every idle adapter a zero gradient instead would cost a pass over all K adapters per
step and, worse, let Adam's momentum (and weight decay) keep moving tasks that were not trained in that step.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import safetensors.torch
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..hub import atomic_write
from ..hub.save import save_adapter
from ..tuner import TAPSConfig, TAPSLayer
from ..tuner.targets import find_head

TaskData = Union[DataLoader, tuple[torch.Tensor, torch.Tensor]]  # a loader, or (inputs, labels) tensors
LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> task loss


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _accelerator(accelerator: Any) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if accelerator is None:
        return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.num_processes > 1 and not getattr(accelerator.ddp_handler, "find_unused_parameters", False):
        raise ValueError("Joint training uses one task's parameters per step: build the Accelerator with "
                         "kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)].")
    return accelerator


def _loaders(tasks: Mapping[str, TaskData], batch_size: int, seed: int) -> list[DataLoader]:
    return [d if isinstance(d, DataLoader) else DataLoader(TensorDataset(*d), batch_size, shuffle=True,
                                                          generator=torch.Generator().manual_seed(seed + i))
            for i, d in enumerate(tasks.values())]


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:  # a new shuffle each epoch
        yield from loader


def _run(accelerator: Any, model: nn.Module, opt: torch.optim.Optimizer, loaders: list[DataLoader], names: list[str],
         steps: int, select: Callable[[str], None], loss_fn: LossFn, penalty: Callable[[], torch.Tensor],
         schedule: str) -> None:
    """``steps`` batches per task, round-robin (one optimizer step each) or mixed (one step per round), cosine lr."""
    per_round = len(names) if schedule == "round_robin" else 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps * per_round)  # stepped by hand: once per step
    model, opt, *loaders = accelerator.prepare(model, opt, *loaders)
    batches = [_cycle(dl) for dl in loaders]
    model.train()
    for _ in range(steps):
        for i, name in enumerate(names):
            select(name)
            last = schedule == "round_robin" or i == len(names) - 1
            with nullcontext() if last else accelerator.no_sync(model):  # mixed: one all-reduce, of the sum
                accelerator.backward(loss_fn(model, next(batches[i])) + penalty())
            if last:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)  # idle tasks keep None gradients: the optimizer skips them


def train_joint(
    base_model: nn.Module, tasks: Mapping[str, TaskData], config: Union[TAPSConfig, Mapping[str, TAPSConfig]],
    steps: int, *, heads: Optional[Mapping[str, nn.Module]] = None, train_base: str = "gated",
    schedule: str = "round_robin", lr: float = 1e-3, base_lr: Optional[float] = None,
    weight_decay: float = 0.0, batch_size: int = 64, loss_fn: LossFn = _cross_entropy,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, accelerator: Any = None, seed: int = 0,
) -> PeftModel:
    """Joint TAPS (Eq. 4): K adapters (deltas, scores, norms, heads) and the shared base, trained in one run.

    ``steps`` is the number of batches per task. ``heads`` gives task ``t`` its own head (e.g. another number of
    classes; default: a copy of the base's head). ``train_base``: ``"gated"`` trains the base weights and biases of
    the gated layers, ``"all"`` every base parameter the tasks use (patch embedding, position embedding, ...),
    ``"none"`` none (= independent incremental TAPS per task). ``base_model`` is modified in place.

    Example:
        >>> model = train_joint(vit, {"a": (xa, ya), "b": (xb, yb)}, TAPSConfig(lam=0.2), 300)  # doctest: +SKIP
        >>> model.set_adapter("b"); logits = model.eval()(xb)  # doctest: +SKIP
    """
    if train_base not in ("none", "gated", "all") or schedule not in ("round_robin", "mixed"):
        raise ValueError(f"train_base={train_base!r}, schedule={schedule!r}: use train_base 'none', 'gated' or "
                         "'all' and schedule 'round_robin' or 'mixed'.")
    names = list(tasks)
    if not names or "base" in names:
        raise ValueError(f"tasks={names}: give at least one task, none named 'base' (save_joint's base folder).")
    configs = {t: copy.deepcopy(config[t] if isinstance(config, Mapping) else config) for t in names}
    for c in configs.values():
        c.total_step = c.total_step or steps  # each task's steps (lam_warmup's length)
    head = find_head(base_model)
    model = get_peft_model(base_model, configs[names[0]], adapter_name=names[0])
    for t in names[1:]:
        model.add_adapter(t, configs[t])
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if heads:
        wrapper = model.base_model.model.get_submodule(head or "")
        if not isinstance(wrapper, ModulesToSaveWrapper):
            raise ValueError("heads=... needs a classifier head the model finds (a timm head, classifier, head or fc).")
        for t, h in heads.items():
            old = next(wrapper.modules_to_save[t].parameters())
            wrapper.modules_to_save[t] = copy.deepcopy(h).to(device=old.device, dtype=old.dtype)
    layers = [m for m in model.modules() if isinstance(m, TAPSLayer)]
    adapters = [p.requires_grad_(True) for m in layers for t in names for p in m.adapter_params(t)]
    adapters += [p.requires_grad_(True) for w in wrappers for t in names for p in w.modules_to_save[t].parameters()]
    # all tasks (their scores too: TAPS steps those itself, at TAPSConfig.score_lr, with each task's own penalty)
    opt = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    skip = {id(p) for p in adapters} | {id(p) for w in wrappers for p in w.original_module.parameters()}
    if train_base == "gated":
        shared = [p for m in layers for p in m.get_base_layer().parameters()]
    else:
        shared = [p for p in model.parameters() if id(p) not in skip] if train_base == "all" else []
    if [p.requires_grad_(True) for p in shared]:
        opt.add_param_group({"params": shared, "lr": lr if base_lr is None else base_lr, "weight_decay": weight_decay})
    _run(_accelerator(accelerator), model, opt, _loaders(tasks, batch_size, seed), names, steps,
         model.set_adapter, loss_fn, model.taps_penalty, schedule)  # the active task's penalty
    model.set_adapter(names[0])  # a save records the base as it is then (trained here with the adapters)
    return model


def train_shared_then_incremental(
    base_model: nn.Module, tasks: Mapping[str, TaskData], config: Union[TAPSConfig, Mapping[str, TAPSConfig]],
    steps: int, *, shared_steps: Optional[int] = None, heads: Optional[Mapping[str, nn.Module]] = None,
    shared_lr: Optional[float] = None, accelerator: Any = None, **kwargs: Any,
) -> PeftModel:
    """The memory-efficient variant: fully fine-tune one shared network with a head per task (round-robin,
    ``shared_steps`` batches per task, default ``steps``), then train one TAPS adapter per task on that frozen
    network (``steps`` batches per task; the tasks do not interact, so this is incremental TAPS). ``kwargs`` go to
    ``train_joint`` (``lr``, ``batch_size``, ``loss_fn``, ``optimizer_cls``, ``seed``, ...).

    Example:
        >>> model = train_shared_then_incremental(vit, tasks, TAPSConfig(lam=0.2), 150, heads=heads)  # doctest: +SKIP
    """
    head = find_head(base_model)
    if head is None:
        raise ValueError("train_shared_then_incremental needs a classifier head (a timm head, classifier, head or fc).")
    parent, _, leaf = head.rpartition(".")
    owner, original = base_model.get_submodule(parent), base_model.get_submodule(head)
    task_heads = nn.ModuleDict({t: copy.deepcopy((heads or {}).get(t, original)) for t in tasks})
    multi = _TaskHeads(task_heads)
    setattr(owner, leaf, multi)
    params = [p.requires_grad_(True) for p in base_model.parameters()]
    opt_kwargs = {k: kwargs[k] for k in ("weight_decay",) if k in kwargs}
    opt = kwargs.get("optimizer_cls", torch.optim.AdamW)(params, lr=shared_lr or kwargs.get("lr", 1e-3), **opt_kwargs)
    accelerator = _accelerator(accelerator)
    try:
        _run(accelerator, base_model, opt, _loaders(tasks, kwargs.get("batch_size", 64), kwargs.get("seed", 0)),
             list(tasks), shared_steps or steps, lambda t: setattr(multi, "task", t),
             kwargs.get("loss_fn", _cross_entropy), lambda: torch.zeros((), device=accelerator.device), "round_robin")
    finally:
        setattr(owner, leaf, original)
    return train_joint(base_model, tasks, config, steps, heads=dict(task_heads), train_base="none",
                       accelerator=accelerator, **kwargs)


class _TaskHeads(nn.Module):
    """One head per task in place of the model's head (stage 1 of the shared variant); ``task`` picks one."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads, self.task = heads, next(iter(heads))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.heads[self.task](x, *args, **kwargs)


def base_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The shared base's weights under the plain model's names (no deltas, scores or per-task copies)."""
    if any(m.merged for m in model.modules() if isinstance(m, TAPSLayer)):
        raise ValueError("An adapter is merged into the base weights: call model.unmerge_adapter() first.")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.get_base_model().state_dict().items():
        if any(s in key for s in (".taps_delta.", ".taps_A.", ".taps_B.", ".taps_scores.", ".modules_to_save.")):
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value.detach()
    return out


def save_joint(model: PeftModel, out_dir: Union[str, os.PathLike]) -> Path:
    """Write the shared base to ``out_dir/base/model.safetensors`` (atomically) and each task's adapter to
    ``out_dir/<task>`` (PEFT's ``save_pretrained(out_dir, selected_adapters=[task])``; ``default`` goes to
    ``out_dir`` itself). Under DDP call it on the main process only.

    Example:
        >>> save_joint(model, "runs/joint")  # doctest: +SKIP
    """
    out, names = Path(out_dir), list(model.peft_config)
    if "base" in names:
        raise ValueError("A task named 'base' would collide with the base folder: rename the adapter.")
    state, seen = {}, set()
    for k, v in base_state_dict(model).items():
        v = v.cpu().contiguous()
        state[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v  # safetensors refuses shared memory
        seen.add(v.untyped_storage().data_ptr())
    (out / "base").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "base" / "model.safetensors", lambda tmp: safetensors.torch.save_file(  # a crash: the old file
        state, str(tmp), metadata={"format": "pt", "taps_tasks": json.dumps(names)}))
    for t in names:
        save_adapter(model, out, selected_adapters=[t])
    return out


def load_joint(base_model: Union[nn.Module, Callable[[], nn.Module]], out_dir: Union[str, os.PathLike], task: str,
               **kwargs: Any) -> PeftModel:
    """A fresh base (a model, or a function making one) with ``save_joint``'s shared weights and ``task``'s adapter.

    A task head of another shape than the base's (another number of classes) is resized before loading; the base's
    own head then holds zeros (only ``disable_adapter()`` would use it). ``kwargs`` go to ``PeftModel.from_pretrained``.

    Example:
        >>> make_vit = lambda: timm.create_model("vit_small_patch16_224")  # doctest: +SKIP
        >>> model = load_joint(make_vit, "runs/joint", "cars")  # doctest: +SKIP
    """
    base = base_model if isinstance(base_model, nn.Module) else base_model()
    out = Path(out_dir)
    base.load_state_dict(safetensors.torch.load_file(out / "base" / "model.safetensors"), strict=True)
    where = out if task == "default" else out / task
    with safetensors.safe_open(str(where / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k.removeprefix("base_model.model."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    own = base.state_dict()
    for name, shape in shapes.items():
        if name in own and tuple(own[name].shape) != shape:
            module_name, _, attr = name.rpartition(".")
            module, old = base.get_submodule(module_name), own[name]
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if attr in module._parameters:
                setattr(module, attr, nn.Parameter(new, requires_grad=module._parameters[attr].requires_grad))
            else:
                module.register_buffer(attr, new)
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = module.weight.shape
    return PeftModel.from_pretrained(base, str(where), adapter_name=task, **kwargs)
