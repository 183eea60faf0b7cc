"""`TAPSModel`: the PEFT tuner that injects TAPS layers and owns the penalty and the gate report."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, onload_layer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

from .config import TAPSConfig
from .layer import (
    _CONV,
    SUPPORTED_LAYERS,
    Conv,
    Linear,
    TAPSLayer,
    _full_tensor,
    _is_sharded,
    sample_groups,
    tensor_key,
)
from .targets import (
    check_modules_to_save,
    check_saved_adapter,
    check_targets,
    default_targets,
    find_head,
    norm_modules,
    planned_targets,
)


class TAPSModel(BaseTuner):
    """Injects TAPS layers into a model; created by ``peft.get_peft_model`` (after ``import taps_peft``).

    Example:
        >>> import timm, taps_peft
        >>> from peft import get_peft_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
        >>> model = get_peft_model(vit, taps_peft.TAPSConfig(lam=0.5))
        >>> loss = task_loss + model.taps_penalty(step)  # doctest: +SKIP
        >>> model.print_taps_summary()  # doctest: +SKIP
    """

    prefix: str = "taps_"
    tuner_layer_cls = TAPSLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: TAPSConfig, model_config: dict) -> TAPSConfig:
        """Resolve the targets, head and norms, and check everything before PEFT replaces a module: a bad config
        or a saved adapter that does not fit raises here and leaves the model (and its other adapters) as it was."""
        head = find_head(self.model)
        if peft_config.modules_to_save is None and head is not None:
            peft_config.modules_to_save = [head]
        requested = peft_config.target_modules
        if peft_config.target_modules is None:
            peft_config.target_modules = set(default_targets(self.model, head))
        else:
            check_targets(self.model, peft_config.target_modules)
        check_modules_to_save(self.model, peft_config.modules_to_save)
        if peft_config.train_norms:
            saved = list(peft_config.modules_to_save or [])
            norms = [n for n in norm_modules(self.model, skip=saved) if n not in saved]
            peft_config.modules_to_save = saved + norms
        targets = planned_targets(self.model, peft_config, requested)
        saved_shapes = peft_config.__dict__.pop("_taps_saved_shapes", None)  # set by TAPSConfig.from_pretrained
        if saved_shapes is not None:
            check_saved_adapter(self.model, peft_config.modules_to_save, targets, saved_shapes)
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
        if isinstance(target, nn.Linear):
            new_module = Linear(target, adapter_name, peft_config)
        elif isinstance(target, _CONV):
            new_module = Conv(target, adapter_name, peft_config)
        else:
            raise TypeError(
                f"TAPS cannot gate `{current_key}` ({type(target).__name__}): it supports "
                f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} and their subclasses. "
                "Remove it from `target_modules` or add it to `exclude_modules`."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter starts frozen, as in PEFT
        self._replace_module(parent, target_name, new_module, target)

    def forward(self, *args: Any, **kwargs: Any):
        self._read_gates()
        return super().forward(*args, **kwargs)

    def _read_gates(self, force: bool = False) -> None:
        """Read every changed score in one device-to-host transfer, so no layer has to sync the GPU on its own."""
        layers = self.taps_layers()
        if not layers or (not force and next(iter(layers[0][1].taps_score.values())).device.type == "cpu"):
            return  # on the CPU each layer reads its own score for free
        active = self.active_adapters
        stale = [
            (layer, name)
            for _, layer in layers
            for name in active
            if name in layer.taps_score
            and not _is_sharded(layer.taps_score[name])  # FSDP2: read inside the layer's forward, where it is whole
            and layer._gates.get(name, (None,))[0] != tensor_key(layer.taps_score[name])
        ]
        if stale:
            values = torch.cat([layer.taps_score[name].detach() for layer, name in stale]).tolist()
            for (layer, name), value in zip(stale, values):
                layer._set_gate(name, value)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """``adapter_names=[...]``: one adapter name per sample (``"__base__"`` for the base model), eval mode only."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval().")
        layers = [m for _, m in self.taps_layers()]
        if any(m.merged for m in layers):
            raise ValueError("Cannot pass `adapter_names` while an adapter is merged: call model.unmerge_adapter().")
        unknown = set(adapter_names) - {"__base__"} - set(self.peft_config)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}. "
                f"Loaded adapters: {', '.join(self.peft_config)} (or '__base__' for the base model)."
            )
        adapter_names = list(adapter_names)
        handles = []
        for m in _tuner_modules(self.model):
            if isinstance(m, TAPSLayer):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(m, ModulesToSaveWrapper):  # heads and norms (PEFT's own routing skips norm layers)
                handles.append(m.register_forward_hook(partial(_route_samples, adapter_names=adapter_names)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ----- adapters on disk hold only the active deltas (PEFT's state-dict hooks) -----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, minus each delta whose score (read from the state dict itself) is below tau, unless
        ``config.save_inactive_deltas`` (resumable training checkpoints)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_inactive_deltas:
            return selected
        suffix = f".taps_delta.{adapter_name}"
        for key in [k for k in selected if k.endswith(suffix)]:
            score = selected[key[: -len(suffix)] + f".taps_score.{adapter_name}"]
            if float(score.float().max()) < config.tau:
                del selected[key]
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key mapping, plus real zeros for the deltas of inactive layers (absent from the file); a file
        that does not fit the model's layers, or holds NaN/inf, is refused before anything is loaded.

        (``PeftModel.from_pretrained`` / ``load_adapter`` have checked the file before the adapter was injected, see
        ``TAPSConfig.from_pretrained``; these checks cover the other ways in, e.g. ``set_peft_model_state_dict``.)"""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        orphans = sorted(k for k in remapped if k.endswith((".taps_delta", ".taps_score")))
        if orphans:
            raise ValueError(
                f"TAPS adapter '{adapter_name}' does not fit this base model: {len(orphans)} saved layer(s) have no "
                f"matching module, e.g. `{orphans[0]}`. Load the adapter onto the base model it was trained from."
            )
        broken = [k for k, v in remapped.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(
                f"TAPS adapter '{adapter_name}' holds NaN/inf values in {len(broken)} tensor(s), e.g. `{broken[0]}`: "
                "it is broken (it diverged in training, or the file was damaged). Load an earlier checkpoint."
            )
        for name, module in model.named_modules():
            if not (isinstance(module, TAPSLayer) and adapter_name in module.taps_delta):
                continue
            if f"{name}.taps_score.{adapter_name}" not in remapped:
                raise ValueError(
                    f"TAPS adapter '{adapter_name}' does not fit this base model: the weights have no score for the "
                    f"layer `{name}` (every TAPS adapter saves all its scores). Load the adapter onto the base model "
                    "it was trained from, with the weights saved with it."
                )
            key = f"{name}.taps_delta.{adapter_name}"
            param = module.taps_delta[adapter_name]
            if key not in remapped:
                device = module.get_base_layer().weight.device
                remapped[key] = torch.zeros(param.shape, dtype=param.dtype, device=device)
            elif tuple(remapped[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"TAPS adapter '{adapter_name}' does not fit this base model: the delta for `{name}` has shape "
                    f"{tuple(remapped[key].shape)} but the layer's weight has shape {tuple(param.shape)}. Load the "
                    "adapter onto the base model it was trained from (its README names it)."
                )
        return remapped

    # ----- the paper's penalty and the gate report -----

    def taps_layers(self) -> list[tuple[str, TAPSLayer]]:
        """Every TAPS layer of the model, as (module name, layer); cached, refreshed when adapters change."""
        cache = self.__dict__.get("_taps_layer_cache")
        if cache is None:
            cache = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TAPSLayer)]
            self.__dict__["_taps_layer_cache"] = cache
        return cache

    def _replace_module(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_taps_layer_cache", None)  # a layer came or went (inject, unload)
        super()._replace_module(*args, **kwargs)

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(*args, **kwargs)
        # PEFT matches modules_to_save by name suffix, so "norm" also wraps e.g. timm's `attn.norm` (an Identity);
        # a module without parameters or buffers has nothing task-specific: put the plain module back.
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and not module.original_module.state_dict():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.original_module)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, in a time that does not grow with the adapters loaded: the walk skips the per-task
        copies inside the head/norm wrappers, and each layer touches only its old and new active adapters."""
        for module in _tuner_modules(self.model):
            if isinstance(module, AuxiliaryTrainingWrapper):
                name = module.check_set_adapter(adapter_name)
                module.set_adapter(name if name in module._adapters else [], inference_mode=inference_mode)
                continue
            if module.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                module.unmerge()
            module.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, visiting only the TAPS layers (not the per-task head/norm copies)."""
        self._check_merge_allowed()
        for _, layer in self.taps_layers():
            with onload_layer(layer):
                layer.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's ``unmerge_adapter``, visiting only the TAPS layers."""
        for _, layer in self.taps_layers():
            with onload_layer(layer):
                layer.unmerge()

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.pop("_taps_layer_cache", None)
        super().delete_adapter(adapter_name)

    def taps_penalty(self, step: Optional[int] = None) -> torch.Tensor:
        """``(lam / L) * sum_i |s_i|`` over the gated layers of each active adapter; add it to the task loss.

        ``step`` (optimizer steps so far) enables the warm-up: no penalty while ``step < warmup_steps``. With a
        budget (``budget_layers`` / ``budget_mib``), each call in training first moves ``lam`` by dual ascent:
        up while the active layers exceed the budget, down (to 0 at least) while they are within it.

        Example:
            >>> loss = F.cross_entropy(model(x), y) + model.taps_penalty(step)  # doctest: +SKIP
        """
        total: Optional[torch.Tensor] = None
        layers = self.taps_layers()
        for name in self.active_adapters:
            config = self.peft_config[name]
            scores = [_full_tensor(m.taps_score[name]) for _, m in layers if name in m.taps_score]
            if not scores or (step is not None and step < config.warmup_steps):
                continue
            if self.training and torch.is_grad_enabled():
                self._adapt_lam(name)
            term = torch.cat(scores).abs().sum() * (config.lam / len(scores))
            total = term if total is None else total + term
        if total is None:
            device = next(iter(self.model.parameters())).device
            return torch.zeros((), device=device)
        return total

    def budget_usage(self, adapter_name: Optional[str] = None) -> dict[str, float]:
        """The budgeted quantities now: ``layers`` (active layers) and ``mib`` (MiB of active deltas)."""
        adapter_name = adapter_name or self.active_adapters[0]
        active = [m for _, m in self.taps_layers() if adapter_name in m.taps_score and m.is_active(adapter_name)]
        return {"layers": len(active), "mib": sum(m.taps_delta[adapter_name].nbytes for m in active) / 2**20}

    def _adapt_lam(self, adapter_name: str) -> None:
        """One dual-ascent step on ``lam`` for each budget the adapter has."""
        config = self.peft_config[adapter_name]
        budgets = {"layers": config.budget_layers, "mib": config.budget_mib}
        if all(b is None for b in budgets.values()):
            return
        used = self.budget_usage(adapter_name)
        excess = max((used[k] - b) / max(b, 1e-9) for k, b in budgets.items() if b is not None)
        config.lam = max(0.0, config.lam + config.budget_rate * excess)

    def taps_layer_report(self, adapter_name: Optional[str] = None) -> list[dict[str, Any]]:
        """One row per gated layer: ``name``, ``score``, ``active`` (score >= tau) and ``params`` (delta size).

        Example:
            >>> [r["name"] for r in model.taps_layer_report() if r["active"]]  # doctest: +SKIP
        """
        adapter_name = adapter_name or self.active_adapters[0]
        return [
            {
                "name": name,
                "score": float(_full_tensor(layer.taps_score[adapter_name]).detach().float().item()),
                "active": layer.is_active(adapter_name),
                "params": layer.taps_delta[adapter_name].numel(),
            }
            for name, layer in self.taps_layers()
            if adapter_name in layer.taps_score
        ]

    def taps_summary(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """Active layers k/L, task-specific parameters (active deltas, scores, norms, head) and adapter bytes."""
        adapter_name = adapter_name or self.active_adapters[0]
        report = self.taps_layer_report(adapter_name)
        active = [r for r in report if r["active"]]
        layers = dict(self.taps_layers())
        delta_bytes = sum(layers[r["name"]].taps_delta[adapter_name].nbytes for r in active)
        score_params = len(report)
        saved = [
            t
            for m in self.model.modules()
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
            for t in m.modules_to_save[adapter_name].state_dict().values()
        ]
        saved_params = sum(t.numel() for t in saved if t.is_floating_point())
        task_params = sum(r["params"] for r in active) + score_params + saved_params
        base_params = _base_param_count(self.model)
        config = self.peft_config[adapter_name]
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
            "adapter_bytes": delta_bytes + 4 * score_params + sum(t.nbytes for t in saved),
        }

    def print_taps_summary(self, adapter_name: Optional[str] = None, show_layers: bool = False) -> None:
        """Print the summary (like ``print_trainable_parameters``), optionally with the per-layer table."""
        s = self.taps_summary(adapter_name)
        if show_layers:
            rows = self.taps_layer_report(s["adapter"])
            width = max([len(r["name"]) for r in rows] + [5])
            print(f"{'layer':<{width}}  {'score':>8}  active  {'params':>10}")
            for r in rows:
                print(f"{r['name']:<{width}}  {r['score']:>8.4f}  {'yes' if r['active'] else 'no':>6}  {r['params']:>10,}")
        pct = 100.0 * s["active_layers"] / max(s["total_layers"], 1)
        budget = ""
        if s["budget"]:
            used = self.budget_usage(s["adapter"])
            parts = [f"{used[k]:.3g}/{v:.3g} {k}" for k, v in s["budget"].items()]
            met = all(used[k] <= v for k, v in s["budget"].items())
            budget = f" || budget {', '.join(parts)} ({'met' if met else 'NOT met'}, lam={s['lam']:.3g})"
        print(
            f"TAPS adapter '{s['adapter']}': active layers: {s['active_layers']}/{s['total_layers']} ({pct:.1f}%) || "
            f"task-specific params: {s['task_specific_params']:,} ({s['task_specific_percent']:.2f}% of base "
            f"{s['base_params']:,}) || adapter size: {s['adapter_bytes'] / 2**20:.2f} MiB{budget}"
        )


def _base_param_count(model: nn.Module) -> int:
    """Parameters of the base model alone (no deltas, scores or per-adapter copies)."""
    extra = set()
    for m in model.modules():
        if isinstance(m, TAPSLayer):
            extra |= {id(p) for p in [*m.taps_delta.values(), *m.taps_score.values()]}
        elif isinstance(m, ModulesToSaveWrapper):
            extra |= {id(p) for p in m.modules_to_save.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in extra)


def _tuner_modules(model: nn.Module) -> list[nn.Module]:
    """The TAPS layers and head/norm wrappers of ``model``, without walking into them (a wrapper holds a copy of
    its module per adapter)."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, (TAPSLayer, AuxiliaryTrainingWrapper)):
            found.append(module)
        else:
            stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return found


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _route_samples(wrapper: ModulesToSaveWrapper, args: tuple, output: torch.Tensor, adapter_names: list[str]):
    """Forward hook: recompute a head/norm output so each sample uses its own task's copy (``__base__``: the
    original module). Heads and norms are cheap next to the gated layers."""
    out = output.clone()
    for name, rows in sample_groups(adapter_names, output.device):
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out.index_copy_(0, rows, module(args[0].index_select(0, rows), *args[1:]))
    return out
