"""Train a TAPS adapter with the 🤗 Transformers ``Trainer``: :class:`TAPSTrainer` and :class:`TAPSCallback`.

``TAPSTrainer`` is a drop-in ``Trainer`` for a TAPS ``PeftModel``. It adds the paper's penalty
``model.taps_penalty(global_step)`` to the training loss, gives the scores their own learning rate
(``score_learning_rate``) in the optimizer that ``TrainingArguments.optim`` picks, and logs the active layers k/L and
the penalty (``taps_active_layers``, ``taps_total_layers``, ``taps_penalty``) with every training log. Checkpoints
(``save_steps``) and ``save_model`` write the adapter (``adapter_config.json`` + ``adapter_model.safetensors``), as
for every PEFT model.

Why a subclass and not ``compute_loss_func``: the Trainer calls ``compute_loss_func(outputs, labels,
num_items_in_batch=...)``, without the model or the step (no warm-up), also during evaluation (the penalty would land in
``eval_loss``), after taking the labels away from the model (the function has to re-implement the model's own loss),
and expects a loss already normalised over the accumulated batch, which the Trainer then multiplies by the number of
processes under ``average_tokens_across_devices`` (a penalty inside it would count once per process). A
``TrainerCallback`` can read the model and the step but cannot change the loss. ``compute_loss`` sees everything.

Example:
    >>> import taps_peft
    >>> from peft import get_peft_model
    >>> from transformers import TrainingArguments
    >>> from taps_peft.training import TAPSTrainer
    >>> model = get_peft_model(vit, taps_peft.TAPSConfig(lam=0.5))  # doctest: +SKIP
    >>> args = TrainingArguments("runs/birds", learning_rate=1e-3, max_steps=1000, save_steps=500)  # doctest: +SKIP
    >>> trainer = TAPSTrainer(model, args, train_dataset=ds, score_learning_rate=1e-2)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> model.save_pretrained("runs/birds/adapter")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

try:  # transformers >= 5: optimizer "factories" (Muon, Dion, ...) build their own parameter groups
    from transformers.trainer_optimizer import is_optimizer_factory as _is_optimizer_factory
except ImportError:  # pragma: no cover - older transformers

    def _is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False


logger = logging.get_logger(__name__)

SCORE_KEY = ".taps_scores."  # a parameter is a TAPS score iff its name contains this
_OWN_PARAMS = ("params", "model", "optimizer_dict")  # optimizer kwargs that replace the Trainer's parameter groups


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


def taps_param_groups(
    model: nn.Module,
    score_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    decay_parameter_names: Optional[Union[list[str], set[str]]] = None,
) -> list[dict[str, Any]]:
    """Trainer-style parameter groups for a TAPS model: weights with decay, weights without decay, and the scores
    (``score_lr`` if given, never weight decay). Groups without an ``lr`` use the optimizer's ``lr``.

    ``decay_parameter_names``: the names that get ``weight_decay`` (``Trainer.get_decay_parameter_names``); all
    non-score parameters when ``None``.

    Example:
        >>> groups = taps_param_groups(model, score_lr=1e-2, weight_decay=0.01)  # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)  # doctest: +SKIP
    """
    decay_names = None if decay_parameter_names is None else set(decay_parameter_names)
    decay, no_decay, scores = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if SCORE_KEY in f".{name}.":
            scores.append(param)
        elif decay_names is None or name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)
    if not scores:
        raise ValueError("No trainable TAPS score found: pass a model from get_peft_model(base, TAPSConfig(...)).")
    score_group: dict[str, Any] = {"params": scores, "weight_decay": 0.0}
    if score_lr is not None:
        score_group["lr"] = score_lr
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}, score_group]
    return [g for g in groups if g["params"]]


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


def taps_log_metrics(model: nn.Module, step: Optional[int] = None) -> dict[str, float]:
    """What TAPS adds to a training log: ``taps_active_layers`` (k), ``taps_total_layers`` (L) and
    ``taps_penalty`` (``model.taps_penalty(step)``, the term added to the loss at that step).

    Example:
        >>> taps_log_metrics(model, step=100)  # doctest: +SKIP
        {'taps_active_layers': 9, 'taps_total_layers': 12, 'taps_penalty': 0.054}
    """
    from ..report import taps_summary

    taps_model = unwrap_taps_model(model)
    summary = taps_summary(taps_model)
    with torch.no_grad():
        penalty = float(taps_model.taps_penalty(step).detach().float().cpu())
    return {
        "taps_active_layers": summary["active_layers"],
        "taps_total_layers": summary["total_layers"],
        "taps_penalty": round(penalty, 6),
    }


class TAPSCallback(TrainerCallback):
    """Adds ``taps_active_layers``, ``taps_total_layers`` and ``taps_penalty`` to every training log (the logs with a
    ``loss`` or ``train_loss``) and to ``state.log_history``.

    :class:`TAPSTrainer` installs one itself, first in the callback list so that every reporter (TensorBoard, W&B,
    the progress bar, ...) sees the values. With another ``Trainer`` pass ``callbacks=[TAPSCallback()]``: the log
    history and the progress bar get the values, reporters listed before it do not. It only logs: the penalty must
    still be added to the loss (that is what :class:`TAPSTrainer` does).

    Example:
        >>> trainer = TAPSTrainer(model, args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> [(h["step"], h["taps_active_layers"]) for h in trainer.state.log_history if "loss" in h]  # doctest: +SKIP
        [(5, 12), (10, 11), (15, 9), (20, 9)]
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or model is None or not ({"loss", "train_loss"} & logs.keys()):
            return
        if "taps_active_layers" in logs:  # already added (a second TAPSCallback)
            return
        extra = taps_log_metrics(model, state.global_step)
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
    """A ``transformers.Trainer`` for TAPS ``PeftModel``s: the training loss gets ``taps_penalty(global_step)``, the
    scores get their own learning rate, and the logs get the active layers k/L and the penalty.

    Args:
        model: A TAPS ``PeftModel`` (``get_peft_model(base, TAPSConfig(...))``); all other ``Trainer`` arguments
            are passed on unchanged.
        score_learning_rate: Learning rate of the scores (``args.learning_rate`` when ``None``). Adam-type optimizers
            move a score by about the learning rate per step, so give scores e.g. ``1e-2`` (10-100x the weights');
            the lr schedule scales both groups alike. Scores never get weight decay.
        taps_logging: Add ``taps_active_layers``, ``taps_total_layers`` and ``taps_penalty`` to the training logs
            (a :class:`TAPSCallback`).
        freeze_gates_at: Fix the gates (``model.freeze_gates()``) once this fraction of ``max_steps`` is done
            (default 0.8; ``None``: never): no gate flips in the last steps, and closed layers skip their weight
            gradient. Under DDP the Trainer's default (finding unused parameters for PEFT models) is needed.
        recalibrate_bn: After training, re-estimate the task's BatchNorm statistics on up to 512 training images,
            changing no weight (``taps_peft.recalibrate_batchnorm``; the same images on every process; default on); save the model after
            ``train()``. Both defaults are measured in docs/results.md.

    The penalty is added in training mode only (``eval_loss`` is the task loss alone), once per optimizer step
    whatever the gradient accumulation (it is divided by the number of micro-batches whenever the Trainer does not
    divide the loss itself), and is not multiplied by the number of processes (DDP averages the identical penalty
    gradients of the ranks). The optimizer is the one ``args.optim`` (or ``optimizer_cls_and_kwargs``) names, with
    three groups: weights with decay, weights without (biases, norms), scores. Optimizers that build their own
    parameter groups (GaLore, LOMO, Muon, ...) are used as the Trainer builds them, without a separate score lr; an
    ``optimizers=(optimizer, scheduler)`` pair is used as given (see ``taps_param_groups``).

    Example:
        >>> args = TrainingArguments("runs/birds", learning_rate=1e-3, num_train_epochs=30)  # doctest: +SKIP
        >>> trainer = TAPSTrainer(model, args, train_dataset=train_ds, score_learning_rate=1e-2)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.model.print_taps_summary()  # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        score_learning_rate: Optional[float] = None,
        taps_logging: bool = True,
        freeze_gates_at: Optional[float] = 0.8,
        recalibrate_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        unwrap_taps_model(self.model)  # fail early, with a fix, on a model without TAPS
        if score_learning_rate is not None and not score_learning_rate > 0:
            raise ValueError(f"score_learning_rate={score_learning_rate!r} is invalid: use a float > 0, e.g. 1e-2.")
        if freeze_gates_at is not None and not 0 <= freeze_gates_at <= 1:
            raise ValueError(f"freeze_gates_at={freeze_gates_at!r} is invalid: use a fraction in [0, 1], e.g. 0.8.")
        if freeze_gates_at is not None and self.args.world_size > 1 and self.args.ddp_find_unused_parameters is False:
            raise ValueError(
                "freeze_gates_at under DDP: closed layers and scores get no gradient once the gates are fixed, and "
                "ddp_find_unused_parameters=False forbids that: leave it unset (the Trainer then finds unused "
                "parameters for PEFT models), or pass freeze_gates_at=None."
            )
        self.score_learning_rate = score_learning_rate
        self.freeze_gates_at, self.recalibrate_bn = freeze_gates_at, recalibrate_bn
        if taps_logging and not any(isinstance(cb, TAPSCallback) for cb in self.callback_handler.callbacks):
            # first, so that reporting integrations and the progress bar see the TAPS values
            self.callback_handler.callbacks.insert(0, TAPSCallback())
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
        from ..budget import adapt_lam

        taps_model = unwrap_taps_model(model)
        if self.freeze_gates_at is not None and self.state.global_step >= self.freeze_gates_at * self.state.max_steps:
            taps_model.freeze_gates()
        adapt_lam(taps_model)  # a budget moves lam (nothing without one)
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Union[torch.Tensor, Any]],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """The Trainer's loss plus, in training mode, ``taps_penalty(self.state.global_step)`` (see the class notes
        on gradient accumulation). A non-finite training loss stops training with a ``FloatingPointError`` (one host
        read of the loss per micro-batch, as the Trainer's own logging makes)."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = unwrap_taps_model(self.model).taps_penalty(self.state.global_step)
        if self._loss_is_scaled_for_ga(num_items_in_batch):  # training_step will not divide by the micro-batches
            micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            penalty = penalty / micro_batches
        loss = loss + penalty.to(loss.device, loss.dtype)
        if not torch.isfinite(loss.detach()).all():  # stop before a NaN/inf gradient reaches a weight or a checkpoint
            raise FloatingPointError(
                f"TAPSTrainer: the training loss is {loss.detach().float().item()} at step "
                f"{self.state.global_step + 1} (penalty {float(penalty.detach()):.4g}): training stopped before this step's "
                "update, and no checkpoint of it was saved. Lower learning_rate or score_learning_rate, set "
                "max_grad_norm, or prefer bf16 to fp16; resume_from_checkpoint restarts from the last checkpoint."
            )
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Optional[Union[torch.Tensor, int]]) -> bool:
        """Whether ``training_step`` takes the loss as already scaled for gradient accumulation (its own rule)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The optimizer of ``args.optim`` (or ``optimizer_cls_and_kwargs``) over weights with decay, weights without
        decay and the scores (``score_learning_rate``, no decay)."""
        if self.optimizer is not None:  # given as `optimizers=(optimizer, scheduler)`: used as is
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        cls_and_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
        if cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if _is_optimizer_factory(optimizer_cls) or any(k in optimizer_kwargs for k in _OWN_PARAMS):
            if self.score_learning_rate is not None:
                logger.warning(
                    f"TAPSTrainer: optim={self.args.optim} builds its own parameter groups, so the scores use its "
                    "learning rate: score_learning_rate is ignored."
                )
            return super().create_optimizer(model)
        groups = taps_param_groups(
            opt_model,
            score_lr=self.score_learning_rate,
            weight_decay=self.args.weight_decay,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
