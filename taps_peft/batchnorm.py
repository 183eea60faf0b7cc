"""BatchNorm and TAPS: re-estimating a task's statistics after training, without changing any weight (torch's
``torch.optim.swa_utils.update_bn`` on the task's own BatchNorm layers only), and keeping the shared base's frozen
BatchNorm layers in eval mode (``freeze_norm``)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.optim.swa_utils import update_bn


RECALIBRATION_IMAGES = 512  # what taps-peft train and TAPSTrainer re-estimate the statistics on, at most


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], forward: Optional[Callable[[nn.Module, Any], Any]] = None
) -> int:
    """Recompute the running statistics of the active adapter's BatchNorm copies (``train_norms=True``) as the exact
    average over ``batches``, changing no weight; returns how many layers were re-estimated. TAPS layers and their
    head/norm copies are found anywhere inside ``model`` (a PeftModel, a DDP or other wrapper of one); the base's own
    BatchNorm layers are never touched. On a model without adapters (full fine-tuning, a baseline) every BatchNorm layer
    is re-estimated.

    All or nothing: an empty ``batches`` raises a ``ValueError``, and if iterating or the forward raises, every
    statistic is put back as it was before the call.

    The running statistics average activations seen during training. When a gate closes (or opens) in the last steps,
    the layers after it see other activations than the statistics describe, and eval accuracy drops (ImageNet
    MobileNetV2 on digits: 0.95 -> 0.76 after a late gate flip, 0.955 after re-estimation; on EfficientNet-Lite0 a short
    schedule gains 0.01-0.05, docs/results.md). Run it after the last gate change, e.g. after ``model.freeze_gates()``
    and training, on a few hundred training images (``taps-peft train`` and ``TAPSTrainer`` use up to
    ``RECALIBRATION_IMAGES``, the same images on every process).

    Example:
        >>> recalibrate_batchnorm(model, (x for x, _ in train_loader))  # doctest: +SKIP
        20
    """
    from .tuner.model import tuner_modules

    found = tuner_modules(model)
    if found:
        candidates = [
            bn
            for wrapper in found
            if isinstance(wrapper, ModulesToSaveWrapper)
            for name in wrapper.active_adapters
            if name in wrapper.modules_to_save
            for bn in wrapper.modules_to_save[name].modules()
        ]
    else:
        candidates = list(model.modules())
    norms = [bn for bn in candidates if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats]
    if not norms:
        return 0
    saved = [(bn.momentum, {k: v.clone() for k, v in bn._buffers.items() if v is not None}) for bn in norms]
    was_training = model.training
    model.eval()  # dropout and every other norm as at inference; update_bn puts only `norms` in training mode
    seen = 0

    def inputs() -> Iterator[tuple[Any]]:
        nonlocal seen
        for batch in batches:
            seen += 1
            yield (batch,)  # update_bn forwards element 0 of a tuple: the batch, whatever its kind

    try:
        update_bn(inputs(), _Selected(model, norms, forward or _default_forward))
        if not seen:
            raise ValueError("recalibrate_batchnorm got no batch: pass a non-empty iterable of inputs (the statistics "
                             "were left as they were).")
    except BaseException:
        for bn, (_, buffers) in zip(norms, saved):
            for key, value in buffers.items():
                bn._buffers[key].copy_(value)
        raise
    finally:
        for bn, (momentum, _) in zip(norms, saved):
            bn.momentum = momentum  # update_bn restores it only when every forward succeeded
        model.train(was_training)
    return len(norms)


class _Selected(nn.Module):
    """What ``update_bn`` sees: only the task's BatchNorm layers as modules (it resets, re-estimates and restores
    those), while a call runs the whole model."""

    def __init__(self, model: nn.Module, norms: list[nn.Module], forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norms)
        object.__setattr__(self, "_model", model)  # not a submodule: update_bn must not touch its other norms
        object.__setattr__(self, "_run", forward)

    def forward(self, batch: Any) -> Any:
        return self._run(self._model, batch)


def _frozen_norm_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen base BatchNorm layer (``freeze_norm``): it stays in eval mode while none of its
    parameters trains."""
    return nn.Module.train(module, mode and any(p.requires_grad for p in module.parameters()))


def freeze_norm(module: nn.Module) -> None:
    """Keep a BatchNorm layer of the shared base in eval mode by itself: ``nn.Module.train`` sets each module's mode
    through its ``train``, which this module overrides (an instance attribute: copied and pickled with the module,
    no forward cost). ``release_norms`` takes the override off."""
    vars(module)["train"] = partial(_frozen_norm_train, module)
    module.eval()


def release_norms(model: nn.Module) -> None:
    """Take ``freeze_norm``'s override off every module of ``model``."""
    for module in model.modules():
        override = vars(module).get("train")
        if isinstance(override, partial) and override.func is _frozen_norm_train:
            del vars(module)["train"]


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The base's BatchNorm layers with running statistics and no trainable parameter; the per-task copies inside
    the head/norm wrappers are the adapters' own and keep the mode they are given."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, ModulesToSaveWrapper):
            stack.append(module.original_module)
            continue
        if (
            isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            and not any(p.requires_grad for p in module.parameters())
        ):
            found.append(module)
        stack.extend(m for m in module._modules.values() if m is not None)
    return found
