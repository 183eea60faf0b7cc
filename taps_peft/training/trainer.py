"""TAPS with the 🤗 Transformers ``Trainer``: the stock ``Trainer`` already trains TAPS, and :class:`TAPSTrainer` /
:class:`TAPSCallback` add what a Trainer can tell the model.

TAPS needs no Trainer of its own: the model applies the paper's penalty and moves the scores at ``score_lr`` at every
optimizer step (``taps_peft.scores``), so ``Trainer(model=get_peft_model(base, TAPSConfig()), ...)`` with its
default optimizer, learning rate and gradient accumulation does TAPS. What a Trainer adds:

- :class:`TAPSCallback` tells the model the training length (``TAPSConfig.total_step``, for ``lam_warmup``) and logs
  the active layers k/L and the penalty (``taps_active_layers``, ``taps_total_layers``, ``taps_penalty``): with a
  stock ``Trainer``, pass ``callbacks=[TAPSCallback()]``.
- :class:`TAPSTrainer` installs that callback and ends training stably: gates frozen for the last 20% of the steps,
  BatchNorm statistics re-estimated, a stop on a non-finite loss or gradient, and the TAPS model card in every save.

Example:
    >>> import taps_peft
    >>> from peft import get_peft_model
    >>> from transformers import Trainer, TrainingArguments
    >>> from taps_peft.training import TAPSCallback, TAPSTrainer
    >>> model = get_peft_model(vit, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> args = TrainingArguments("runs/birds", max_steps=1000, save_steps=500)  # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=ds, callbacks=[TAPSCallback()]).train()  # TAPS  # doctest: +SKIP
    >>> TAPSTrainer(model, args, train_dataset=ds).train()  # TAPS, with a stable end of training  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)



def unwrap_taps_model(model: nn.Module) -> nn.Module:
    """The TAPS ``PeftModel`` inside ``model``, through DDP/DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers; the penalty and the reports live there.

    Example:
        >>> unwrap_taps_model(trainer.model_wrapped).taps_summary()["active_layers"]  # doctest: +SKIP
        7
    """
    seen = model
    for _ in range(8):
        if hasattr(seen, "taps_penalty"):
            return seen
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(seen, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        seen = inner
    raise TypeError(
        f"{type(model).__name__} is not a TAPS model: wrap the base model with "
        "peft.get_peft_model(base, taps_peft.TAPSConfig(...)) (after `import taps_peft`) before building the Trainer."
    )


def check_finite_gradients(parameters: Any, step: int) -> None:
    """Raise a ``FloatingPointError`` when a gradient holds NaN/inf (one host read), before the optimizer step, so no
    non-finite weight, and no checkpoint of one, is ever written."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
        raise FloatingPointError(
            f"a gradient is NaN/inf at step {step + 1} though the loss is finite: training stopped before this step's "
            "update, and no checkpoint of it was saved. Lower the learning rate or the score learning rate, or clip "
            "gradients (max_grad_norm); a checkpoint written before this step is intact."
        )


def taps_log_metrics(model: nn.Module) -> dict[str, float]:
    """What TAPS adds to a training log: ``taps_active_layers`` (k), ``taps_total_layers`` (L) and ``taps_penalty``
    (the value of ``(lam_t / L) * sum |s|`` now).

    Example:
        >>> taps_log_metrics(model)  # doctest: +SKIP
        {'taps_active_layers': 9, 'taps_total_layers': 12, 'taps_penalty': 0.054}
    """
    from ..report import taps_summary

    taps_model = unwrap_taps_model(model)
    summary = taps_summary(taps_model)
    return {
        "taps_active_layers": summary["active_layers"],
        "taps_total_layers": summary["total_layers"],
        "taps_penalty": round(float(_no_grad_penalty(taps_model)), 6),
    }


def _no_grad_penalty(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model.taps_penalty().float().cpu())


class TAPSCallback(TrainerCallback):
    """Tells the model the length of training (``TAPSConfig.total_step``, which ``lam_warmup`` needs, unless the
    config sets it) when training begins, and adds ``taps_active_layers``, ``taps_total_layers`` and
    ``taps_penalty`` to every training log (the logs with a ``loss`` or ``train_loss``) and to ``state.log_history``.

    :class:`TAPSTrainer` installs one itself, first in the callback list so that every reporter (TensorBoard, W&B,
    the progress bar, ...) sees the values. With a stock ``Trainer`` pass ``callbacks=[TAPSCallback()]``: the log
    history and the progress bar get the values, reporters listed before it do not. The penalty itself needs no
    callback: the model applies it at every optimizer step.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[TAPSCallback()])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> [(h["step"], h["taps_active_layers"]) for h in trainer.state.log_history if "loss" in h]  # doctest: +SKIP
        [(5, 12), (10, 11), (15, 9), (20, 9)]
    """

    def __init__(self, log: bool = True) -> None:
        self.log = log  # False: only the training length
        self._set: set[str] = set()  # adapters whose total_step this callback set (it follows each train() call)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if model is None:
            return
        taps_model = unwrap_taps_model(model)
        for name, config in taps_model.peft_config.items():
            if config.total_step is None or name in self._set:
                config.total_step = max(1, int(state.max_steps))
                self._set.add(name)
            if state.global_step:  # a resumed run continues lam's ramp where it was
                taps_model.base_model.note_score_step(name, state.global_step)
        if self.log and state.is_world_process_zero:
            from ..report import taps_training_plan

            print(taps_training_plan(taps_model))  # what this run trains, as taps-peft train prints it

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if not self.log or logs is None or model is None or not ({"loss", "train_loss"} & logs.keys()):
            return
        if "taps_active_layers" in logs:  # already added (a second TAPSCallback)
            return
        extra = taps_log_metrics(model)
        # Trainer.log appends a copy of `logs` to the history just before on_log: complete that entry as well.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(
            k in last and last[k] is v for k, v in logs.items()
        ):
            last.update(extra)
        logs.update(extra)


class _FiniteGradients(TrainerCallback):
    """Checks the gradients before every optimizer step (see :func:`check_finite_gradients`); with a ``GradScaler``
    (fp16) the scaler itself skips steps with inf gradients, so nothing is checked."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs: Any) -> None:
        if model is not None and getattr(optimizer, "scaler", None) is None:
            check_finite_gradients(model.parameters(), state.global_step)


class TAPSTrainer(Trainer):
    """A ``transformers.Trainer`` for TAPS ``PeftModel``s with a stable end of training. The TAPS training itself
    (penalty, score steps) is the model's and runs in any Trainer; this one adds a :class:`TAPSCallback` (training
    length for ``lam_warmup``, k/L and penalty in the logs), frozen gates at the end, re-estimated BatchNorm
    statistics, a stop on non-finite losses and gradients, and the TAPS model card in every save.

    Args:
        model: A TAPS ``PeftModel`` (``get_peft_model(base, TAPSConfig(...))``); all other ``Trainer`` arguments
            are passed on unchanged. The scores' learning rate is ``TAPSConfig.score_lr``.
        taps_logging: Add ``taps_active_layers``, ``taps_total_layers`` and ``taps_penalty`` to the training logs.
        freeze_gates_at: Fix the gates (``model.freeze_gates()``) once this fraction of ``max_steps`` is done
            (default 0.8; ``None``: never): no gate flips in the last steps, and closed layers skip their weight
            gradient. Under DDP the Trainer's default (finding unused parameters for PEFT models) is needed.
        recalibrate_bn: After training, re-estimate the task's BatchNorm statistics on up to 512 training images,
            changing no weight (``taps_peft.recalibrate_batchnorm``; the same images on every process; default on); save the model after
            ``train()``. Both defaults are measured in docs/results.md.

    Example:
        >>> args = TrainingArguments("runs/birds", learning_rate=1e-3, num_train_epochs=30)  # doctest: +SKIP
        >>> trainer = TAPSTrainer(model, args, train_dataset=train_ds)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.model.print_taps_summary()  # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        taps_logging: bool = True,
        freeze_gates_at: Optional[float] = 0.8,
        recalibrate_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        if "score_learning_rate" in kwargs:
            raise TypeError(
                "TAPSTrainer(score_learning_rate=...) is gone: the scores' learning rate is the model's now, in any "
                "Trainer or loop. Set it in the config: TAPSConfig(score_lr=1e-2)."
            )
        super().__init__(*args, **kwargs)
        unwrap_taps_model(self.model)  # fail early, with a fix, on a model without TAPS
        if freeze_gates_at is not None and not 0 <= freeze_gates_at <= 1:
            raise ValueError(f"freeze_gates_at={freeze_gates_at!r} is invalid: use a fraction in [0, 1], e.g. 0.8.")
        if freeze_gates_at is not None and self.args.world_size > 1 and self.args.ddp_find_unused_parameters is False:
            raise ValueError(
                "freeze_gates_at under DDP: closed layers and scores get no gradient once the gates are fixed, and "
                "ddp_find_unused_parameters=False forbids that: leave it unset (the Trainer then finds unused "
                "parameters for PEFT models), or pass freeze_gates_at=None."
            )
        self.freeze_gates_at, self.recalibrate_bn = freeze_gates_at, recalibrate_bn
        for config in unwrap_taps_model(self.model).peft_config.values():  # the model's schedule fixes them then too
            config.freeze_gates_at = freeze_gates_at or None  # (0: training_step fixes them at once)
        if not any(isinstance(cb, TAPSCallback) for cb in self.callback_handler.callbacks):
            # first, so that reporting integrations and the progress bar see the TAPS values
            self.callback_handler.callbacks.insert(0, TAPSCallback(log=taps_logging))
        self.callback_handler.add_callback(_FiniteGradients())

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; warns when resuming from checkpoints that lack the inactive layers' deltas."""
        configs = unwrap_taps_model(self.model).peft_config.values()
        if resume_from_checkpoint and not all(getattr(c, "save_inactive_deltas", True) for c in configs):
            logger.warning(
                "TAPSTrainer: resuming from a checkpoint saved with save_inactive_deltas=False: the deltas of the "
                "layers that were inactive at that step restart from zero (the run differs from an uninterrupted "
                "one if such a gate reopens). Use TAPSConfig(save_inactive_deltas=True) for exact resumes."
            )
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.recalibrate_bn:
            from torch.utils.data import DataLoader

            from ..batchnorm import RECALIBRATION_IMAGES, recalibrate_batchnorm

            # the same images, in the same order, on every process: every rank ends with the same statistics
            dataset = self.train_dataset
            if hasattr(dataset, "column_names") and self.args.remove_unused_columns:
                dataset = self._remove_unused_columns(dataset, description="recalibration")
            per_batch = max(1, self.args.per_device_train_batch_size)
            loader = DataLoader(dataset, batch_size=per_batch, collate_fn=self.data_collator, shuffle=False)
            batches = itertools.islice(loader, max(1, RECALIBRATION_IMAGES // per_batch))
            with torch.no_grad():
                recalibrate_batchnorm(self.model, (self._prepare_inputs(b) for b in batches))  # labels are dropped
        return result

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """The adapter, with every file written atomically and the TAPS model card (``taps_peft.save_adapter``), and
        what the Trainer saves beside it (processing class, training arguments)."""
        from transformers.trainer import TRAINING_ARGS_NAME

        from ..hub.save import save_adapter

        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(unwrap_taps_model(self.model), output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step``; fixes the gates once ``freeze_gates_at`` of the steps are done."""
        if self.freeze_gates_at is not None and self.state.global_step >= self.freeze_gates_at * self.state.max_steps:
            unwrap_taps_model(model).freeze_gates()
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Union[torch.Tensor, Any]],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """The Trainer's loss, plus in training the TAPS penalty when neither the model (a loss of its own) nor
        ``compute_loss_func`` (``+ model.taps_penalty()``) added it, scaled as the Trainer takes that loss (divided by the
        micro-batches when it counts as normalised over the accumulated batch). A non-finite training loss stops
        training with a ``FloatingPointError`` (one host read of the loss per micro-batch, as the Trainer's own
        logging makes)."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        taps_model = unwrap_taps_model(self.model).base_model
        if model.training and not (taps_model._penalty_in_output or taps_model._penalty_taken):  # never twice
            penalty = taps_model.taps_penalty()
            explicit = getattr(self, "loss_is_scaled_for_ga", None)  # the Trainer's own rule (training_step)
            scaled = explicit if explicit is not None else self.compute_loss_func is not None or (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            if scaled:
                penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)  # training_step won't
            loss = loss + penalty.to(loss.device, loss.dtype)
            result = (loss, result[1]) if return_outputs else loss
        if model.training and not torch.isfinite(loss.detach()).all():  # stop before a NaN/inf gradient lands
            raise FloatingPointError(
                f"TAPSTrainer: the training loss is {loss.detach().float().item()} at step "
                f"{self.state.global_step + 1}: training stopped before this step's update, and no checkpoint of it "
                "was saved. Lower learning_rate or TAPSConfig.score_lr, set max_grad_norm, or prefer bf16 to fp16; "
                "resume_from_checkpoint restarts from the last checkpoint."
            )
        return result
