"""`TAPSModel`: the PEFT tuner that injects TAPS layers and owns the paper's penalty. Its save/load hooks hand saved
adapters to ``taps_peft.trust``, which checks them before they touch a module."""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .. import scores, trust
from ..batchnorm import freeze_norm, frozen_batchnorms, release_norms
from .config import TAPSConfig
from .layer import (
    _CONV, _HALF, DELTA_PARAMS, Conv, Linear, TAPSLayer, is_sharded, check_batch_names, restart_delta, sample_groups,
)
from .targets import resolve_targets


class TAPSModel(BaseTuner):
    """Injects TAPS layers into a model; created by ``peft.get_peft_model`` (after ``import taps_peft``).

    Example:
        >>> import timm, taps_peft
        >>> from peft import get_peft_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
        >>> model = get_peft_model(vit, taps_peft.TAPSConfig(lam=0.5))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the scores learn in any optimizer
        >>> taps_peft.print_taps_summary(model)  # doctest: +SKIP
    """

    prefix: str = "taps_"
    tuner_layer_cls = TAPSLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._init_scores()
        super().__init__(*args, **kwargs)
        scores.bind_loss_hook(self)  # the penalty joins a loss the model computes itself (given labels), in training

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy, pickle
        super().__setstate__(state)
        self._init_scores()
        scores.bind_loss_hook(self)

    def _init_scores(self) -> None:
        """How the scores learn (``taps_peft.scores``): the optimizer-step hook sees this model; the Adam state of an
        optimizer of another kind (``step_scores(model)``) and the steps done per adapter live here."""
        self.__dict__.setdefault("score_state", defaultdict(dict))
        self.__dict__.setdefault("_score_steps", {})
        self.__dict__.setdefault("_warned", set())
        self.__dict__.setdefault("_watch", None)
        self.__dict__.setdefault("_penalized", set())  # adapters whose penalty reached this step's gradients
        self.__dict__["_penalty_in_output"] = False  # this forward's outputs.loss holds the penalty
        self.__dict__["_penalty_taken"] = False  # the loop asked for the penalty with a gradient since this forward
        scores.track(self)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``inject_adapter`` on a copy of the config (the caller's object is never rewritten); then, as PEFT
        matches ``modules_to_save`` by name suffix ("norm" also wraps e.g. timm's ``attn.norm``, an Identity), wrappers
        around modules without state are replaced by the module, and the base's frozen BatchNorm layers keep eval mode by
        themselves (``freeze_norm``: no forward may move the base's statistics)."""
        trust.check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        self.peft_config[adapter_name] = copy.deepcopy(config)
        trust.copy_notes(config, self.peft_config[adapter_name])
        with trust.injecting(self, model, adapter_name, config):  # a saved adapter may be loading
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and not module.original_module.state_dict():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.original_module)
        self._keep_base_norms_frozen()

    def _prepare_adapter_config(self, peft_config: TAPSConfig, model_config: dict) -> TAPSConfig:
        """Resolve the targets, head and norms, checked before PEFT replaces a module; a config read with
        ``TAPSConfig.from_pretrained`` also has its weights file checked as readable (``trust.prepare_load``)."""
        resolve_targets(self.model, peft_config)
        trust.prepare_load(self.model, peft_config)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: TAPSConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, TAPSLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = (Conv if isinstance(target, _CONV) else Linear)(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter starts frozen, as in PEFT
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``: with ``True``, the adapter's fp16/bf16 deltas become fp32, as LoRA's
        weights; head and norm copies keep the base dtype, as LoRA's ``modules_to_save``. Done in place, so a frozen
        adapter stays frozen (PEFT's own cast makes new, trainable parameters; docs/peft-upstream.md)."""
        if autocast_adapter_dtype:
            for _, layer in taps_layers(self.model):
                for param in layer.adapter_params(adapter_name):  # deltas and factors (a score is always fp32)
                    if param.dtype in _HALF:
                        param.data = param.data.float()

    def _keep_base_norms_frozen(self) -> None:
        """BatchNorm layers without trainable parameters (the shared base's, when ``train_norms=False``) stay in eval
        mode by themselves (``freeze_norm``), however train mode is set (``model.train()``,
        ``get_base_model().train()``): their running statistics belong to the base and must not move. The task's
        copies in head/norm wrappers (deep copies PEFT made) train as any module."""
        for wrapper in tuner_modules(self.model):
            if isinstance(wrapper, ModulesToSaveWrapper):
                for module in wrapper.modules_to_save.values():
                    release_norms(module)
        for module in frozen_batchnorms(self.model):
            freeze_norm(module)

    # ----- one forward: host gates read once, mixed-task batches -----

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Runs around every ``PeftModel`` forward. Unless the gates are learning (training with trainable scores:
        no host read at all), every gate the forward needs is read in one device-to-host transfer and handed to the
        layers for this forward only. ``adapter_names=[...]``: one adapter per sample (``"__base__"`` for the base
        model), eval mode only."""
        adapter_names = kwargs.pop("adapter_names", None)
        modules = tuner_modules(self.model)
        layers = [m for m in modules if isinstance(m, TAPSLayer)]
        handles = []
        if adapter_names is not None:
            adapter_names = self._check_adapter_names(adapter_names, layers)
            for m in modules:
                if isinstance(m, TAPSLayer):
                    hook = partial(adapter_names_pre_forward_hook, adapter_names=adapter_names)
                    handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
                elif isinstance(m, ModulesToSaveWrapper):  # heads and norms (PEFT's own routing skips norm layers)
                    handles.append(m.register_forward_hook(partial(route_samples, adapter_names=adapter_names)))
        names = self.active_adapters if adapter_names is None else list(dict.fromkeys(adapter_names))
        gates: dict[TAPSLayer, dict[str, bool]] = {}
        compiling = torch.compiler.is_compiling()
        self.__dict__.update(_penalty_in_output=False, _penalty_taken=False)
        if self.training and torch.is_grad_enabled() and not compiling:
            scores.check_step(self, layers)
        routing = layers if adapter_names is not None else []
        try:  # plain attributes, set in __dict__: nn.Module.__setattr__ would cost ~10 calls per layer and forward
            gates = {} if compiling else read_gates(layers, names)
            for layer, layer_gates in gates.items():
                layer.__dict__["_gates"] = layer_gates
            for layer in routing:
                layer.__dict__["_routing"] = True
            yield
        finally:
            for layer in gates:
                layer.__dict__["_gates"] = None
            for layer in routing:
                layer.__dict__["_routing"] = False
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names: Any, layers: list[TAPSLayer]) -> list[str]:
        if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
            raise TypeError(
                f"adapter_names={adapter_names!r} is invalid: pass a list with one adapter name per sample, e.g. "
                "adapter_names=['task_a', 'task_b', '__base__'] for a batch of 3."
            )
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval().")
        if any(m.merged for m in layers):
            raise ValueError("Cannot pass `adapter_names` while an adapter is merged: call model.unmerge_adapter().")
        self._check_known(set(adapter_names) - {"__base__"}, "infer with", "(or '__base__' for the base model)")
        return list(adapter_names)

    def _check_known(self, names: Any, action: str, extra: str = "") -> None:
        """Refuse adapter names that are not loaded, naming those that are."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Cannot {action} non-existing adapter(s): {', '.join(map(repr, sorted(unknown)))}. Loaded adapters: "
                f"{', '.join(map(repr, self.peft_config))} {extra}".rstrip() + "."
            )

    # ----- adapters on disk hold only the active deltas (PEFT's state-dict hooks) -----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, minus each delta (or factors A, B) whose score (read from the state dict itself) is below
        tau, unless ``config.save_inactive_deltas`` (resumable training checkpoints). The base is recorded as it is now
        and the config binds itself to these weights when PEFT saves it next (``taps_peft.trust``)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, TAPSModel):
            kept = adapter_name in tuner.__dict__.get("_kept_identity", ())  # loaded onto another base than its own
            trust.record_at_save(config, tuner.model, adapter_name, kept)
        trust.saving(config, model, adapter_name)
        scores = f".taps_scores.{adapter_name}"
        score_keys = [k for k in selected if k.endswith(scores)]
        closed = {k for k in score_keys if float(selected[k].float().max()) < config.tau}  # one host read per score
        if score_keys and len(closed) == len(score_keys):
            warnings.warn(
                f"TAPS adapter {adapter_name!r} is saved with no task-specific layer: every gate is closed (each score "
                f"< tau={config.tau:g}), so it holds only its norms and head. A larger learning rate for the deltas "
                f"or a smaller lam (now {config.lam:g}) keeps layers open: EfficientNet-Lite0 with the 🤗 Trainer "
                "on the main job's digit rotation kept 0 of 49 at the Trainer's default 5e-5, 8 at 1e-3 (lam 0.5).",
                stacklevel=2,
            )
        if config.save_inactive_deltas:
            return selected
        for key in score_keys:
            name = key[: -len(scores)]
            keys = [f"{name}.{p}.{adapter_name}" for p in DELTA_PARAMS]
            if key in closed:
                for k in keys:
                    selected.pop(k, None)
            elif not any(k in selected for k in keys):  # open, but loaded for inference when closed: a zero delta
                restart = restart_delta(model.get_submodule(name), config, adapter_name)
                selected.update({f"{name}.{p}.{adapter_name}": t for p, t in restart.items()})
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key mapping, inside the checks of ``taps_peft.trust.check_load``: weights that are not this
        adapter's are refused before anything is loaded, and a refused load leaves the model as it was."""
        remap = partial(super()._remap_adapter_state_dict_for_load, model, config, adapter_name)
        return trust.check_load(model, config, adapter_name, state_dict, remap)

    # ----- PEFT's adapter management: set_adapter visits only the tuner modules, names are checked -----
    # PEFT's set_adapter walks every module, including each adapter's head and norm copies, and touches every adapter in
    # every layer: with 50 adapters loaded a switch took 9.0 ms instead of 0.8 ms (benchmarks/bench_switch.py).

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, in a time that does not grow with the adapters loaded; unknown names are refused."""
        self._check_known(adapter_name, "activate")
        for module in tuner_modules(self.model):
            if isinstance(module, AuxiliaryTrainingWrapper):  # (no adapter at all: after deleting the last one)
                name = module.check_set_adapter(adapter_name) if adapter_name else None
                module.set_adapter(name if name in module._adapters else [], inference_mode=inference_mode)
                continue
            if module.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                module.unmerge()
            module.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``; an unknown name is refused (PEFT skips it silently; docs/peft-upstream.md)."""
        if adapter_names is not None:
            self._check_known(adapter_names, "merge")
        super().merge_adapter(adapter_names, safe_merge)

    def _unload_and_optionally_merge(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """PEFT's ``unload`` / ``merge_and_unload`` (unknown names refused); the plain model it returns keeps no TAPS
        hook (the penalty's loss hook, the base BatchNorm layers' eval-mode lock). PEFT has no hook for this cleanup
        (docs/peft-upstream.md)."""
        if adapter_names is not None:
            self._check_known(adapter_names, "merge")
        model = super()._unload_and_optionally_merge(*args, adapter_names=adapter_names, **kwargs)
        release_norms(model)
        scores.remove_loss_hook(model)
        return model

    # ----- the paper's penalty -----

    def taps_layers(self) -> list[tuple[str, TAPSLayer]]:
        """Every TAPS layer of the model, as (module name, layer)."""
        return taps_layers(self.model)

    def freeze_gates(self) -> None:
        """Fix the active adapters' gates for the rest of training, so no gate flips in the last steps: the scores
        stop training, a closed layer computes like its base layer (no delta, no weight gradient: a cheaper step) and
        an open one keeps training its delta. ``set_adapter`` makes the scores trainable again. Under DDP the closed
        layers' deltas then get no gradient: wrap with ``find_unused_parameters=True`` (``taps-peft train`` does).

        Example:
            >>> if step == int(0.8 * total_steps):  # doctest: +SKIP
            ...     model.freeze_gates()
        """
        for _, layer in taps_layers(self.model):
            for name in self.active_adapters:
                if name in layer.taps_scores:
                    layer.taps_scores[name].requires_grad_(False)

    def scores_by_adapter(self) -> dict[str, list[nn.Parameter]]:
        """Every adapter's scores, one per gated layer (``L`` = their number)."""
        found: dict[str, list[nn.Parameter]] = {}
        for _, layer in taps_layers(self.model):
            for name, score in layer.taps_scores.items():
                found.setdefault(name, []).append(score)
        return found

    def note_score_step(self, adapter_name: str, step: int) -> None:
        """The optimizer steps the adapter's scores have taken, which lam's warm-up ramp follows: ``taps_peft.scores`` notes
        each step; a resumed run notes where it resumed (``TAPSCallback`` and ``taps-peft train`` do)."""
        self._score_steps[adapter_name] = step
        config = self.peft_config[adapter_name]
        if config.lam_warmup and not config.total_step and adapter_name not in self._warned:
            self._warned.add(adapter_name)
            warnings.warn(
                f"TAPS adapter '{adapter_name}': lam_warmup={config.lam_warmup} ramps lam over that fraction of "
                "training, but the training length is unknown, so lam applies in full. Set "
                "TAPSConfig(total_step=N) (your number of optimizer steps), or with the 🤗 Trainer pass "
                "callbacks=[taps_peft.training.TAPSCallback()] (TAPSTrainer does).",
                stacklevel=2,
            )

    def taps_penalty(self) -> torch.Tensor:
        """The paper's penalty ``(lam_t / L) * sum_i |s_i|`` over the active adapters (``lam_t``: ``lam`` on its
        warm-up ramp). A model that computes its own loss (a transformers model given ``labels``) has it added to
        ``outputs.loss`` in training already (then this gives its value, without a gradient); a loop that computes
        the loss itself adds it (``taps_peft.scores``).

        Example:
            >>> loss = F.cross_entropy(model(x), y) + model.taps_penalty()  # doctest: +SKIP
        """
        if self._penalty_in_output and torch.is_grad_enabled() and self.training:
            if "penalty-twice" not in self._warned:
                self._warned.add("penalty-twice")
                warnings.warn(
                    "TAPS: the model already added the penalty to the loss it returned (outputs.loss, computed from "
                    "the labels you passed), so model.taps_penalty() now gives its value without a gradient: adding "
                    "it again would change only the number. Use outputs.loss as it is.",
                    stacklevel=2,
                )
            with torch.no_grad():
                return scores.penalty(self)
        if torch.is_grad_enabled() and self.training:
            self._penalty_taken = True  # in this forward's loss (TAPSTrainer then adds nothing)
        return scores.penalty(self)


def tuner_modules(model: nn.Module, with_names: bool = False) -> list[Any]:
    """The TAPS layers and head/norm wrappers anywhere inside ``model`` (a PeftModel, the tuner, a DDP or compile
    wrapper, ...) or (name, module) pairs, without walking into them (a wrapper holds a copy of its module per
    adapter)."""
    found, stack = [], [("", model)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, (TAPSLayer, AuxiliaryTrainingWrapper)):
            found.append((name, module) if with_names else module)
        else:
            prefix = f"{name}." if name else ""
            stack.extend((prefix + n, m) for n, m in reversed(module._modules.items()) if m is not None)
    return found


def taps_layers(model: nn.Module) -> list[tuple[str, TAPSLayer]]:
    """Every TAPS layer anywhere inside ``model`` (a PeftModel, the tuner, a DDP or compile wrapper, a base model with
    injected layers), as (name in the base model, layer)."""
    tuner, stack = None, [model]
    while stack and tuner is None:  # breadth first: the tuner sits near the top
        module = stack.pop(0)
        if isinstance(module, TAPSModel):
            tuner = module
        elif not isinstance(module, (TAPSLayer, AuxiliaryTrainingWrapper)):
            stack.extend(m for m in module._modules.values() if m is not None)
    root = tuner.model if tuner is not None else model
    return [(n, m) for n, m in tuner_modules(root, with_names=True) if isinstance(m, TAPSLayer)]


# ----- one forward's helpers: the gates read on the host, sample routing in mixed-task batches -----


def host_values(tensors: list[torch.Tensor]) -> list[float]:
    """The values of 1-element tensors, read in one device-to-host transfer."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.cat([t.detach().float().reshape(1).to(device) for t in tensors]).tolist()


def read_gates(layers: list[TAPSLayer], names: list[str]) -> dict[TAPSLayer, dict[str, bool]]:
    """The gates of ``names`` in every layer, read in one transfer; none while the gates are learning (grad enabled
    and a trainable score) or sharded (FSDP2: the layer's forward sees them whole)."""
    pairs = [(m, a) for m in layers for a in names if a in m.taps_scores and not is_sharded(m.taps_scores[a])]
    if not pairs or (torch.is_grad_enabled() and any(m.taps_scores[a].requires_grad for m, a in pairs)):
        return {}
    gates: dict[TAPSLayer, dict[str, bool]] = {}
    for (m, a), value in zip(pairs, host_values([m.taps_scores[a] for m, a in pairs])):
        gates.setdefault(m, {})[a] = value >= m.taps_tau[a]
    return gates


def adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def route_samples(wrapper: nn.Module, args: tuple, output: torch.Tensor, adapter_names: list[str]):
    """Forward hook: recompute a head/norm output so each sample uses its own task's copy (``__base__``: the
    original module). Heads and norms are cheap next to the gated layers."""
    check_batch_names(output, adapter_names)
    out = output.clone()
    for name, rows in sample_groups(adapter_names, output.device):
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out.index_copy_(0, rows, module(args[0].index_select(0, rows), *args[1:]))
    return out
