"""`TAPSModel`: the PEFT tuner that injects TAPS layers and owns the penalty and the gate report."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, onload_layer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .config import TAPSConfig
from .layer import _CONV, Conv, Linear, TAPSLayer, _full_tensor, _is_sharded, sample_groups
from .layer import check_batch_names
from .targets import check_modules_to_save, check_targets, default_targets, find_head, norm_modules, planned_targets


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

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        requires_grad = [p.requires_grad for p in model.parameters()]
        input_grads_hook = hasattr(model, "_require_grads_hook")  # PEFT may add one (gradient checkpointing)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # what a failed first load puts back (hub.peft_model.load_adapter)
        self._base_state = {"requires_grad": requires_grad, "input_grads_hook": input_grads_hook}
        from ..hub.peft_model import attach_when_wrapped

        attach_when_wrapped(self)

    def _prepare_adapter_config(self, peft_config: TAPSConfig, model_config: dict) -> TAPSConfig:
        """Resolve the targets, head and norms, and check everything before PEFT replaces a module: a bad config
        raises here and leaves the model (and its other adapters) as it was."""
        head = find_head(self.model)
        if peft_config.modules_to_save is None and head is not None:
            peft_config.modules_to_save = [head]
        requested = peft_config.target_modules
        if peft_config.target_modules is None:
            peft_config.target_modules = set(default_targets(self.model, head))
        else:
            check_targets(self.model, peft_config.target_modules)
        check_modules_to_save(self.model, peft_config.modules_to_save, peft_config.task_type)
        if peft_config.train_norms:
            saved = list(peft_config.modules_to_save or [])
            peft_config.modules_to_save = saved + [n for n in norm_modules(self.model, skip=saved) if n not in saved]
        planned_targets(self.model, peft_config, requested)
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
        """TAPS's dtype rule instead of PEFT's fp16/bf16 -> fp32 upcast: deltas keep the base weight's dtype (an fp32
        copy of a full-size delta would double the layer's bytes) and scores are fp32 from the start."""

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``inject_adapter``; then, as PEFT matches ``modules_to_save`` by name suffix ("norm" also wraps
        e.g. timm's ``attn.norm``, an Identity), wrappers around modules without state are replaced by the module.
        The adapter name is checked first: it becomes a folder name when the adapter is saved."""
        from ..hub.peft_model import check_adapter_name

        check_adapter_name(kwargs["adapter_name"] if "adapter_name" in kwargs else args[1])
        super().inject_adapter(*args, **kwargs)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and not module.original_module.state_dict():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.original_module)
        self._keep_base_norms_frozen()  # timm models start in train mode: no forward may move base statistics

    def _keep_base_norms_frozen(self) -> None:
        for module in _frozen_batchnorms(self.model):
            module.eval()

    def train(self, mode: bool = True) -> "TAPSModel":
        """``nn.Module.train``, except that BatchNorm layers without trainable parameters (the shared base's, when
        ``train_norms=False``) stay in eval mode, as they are from injection on: their running statistics belong to
        the base and must not move."""
        super().train(mode)
        self._keep_base_norms_frozen()
        return self

    # ----- one forward: host gates read once, mixed-task batches -----

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Runs around every ``PeftModel`` forward. Unless the gates are learning (training with trainable scores:
        no host read at all), every gate the forward needs is read in one device-to-host transfer and handed to the
        layers for this forward only. ``adapter_names=[...]``: one adapter per sample (``"__base__"`` for the base
        model), eval mode only."""
        adapter_names = kwargs.pop("adapter_names", None)
        modules = _tuner_modules(self.model)
        layers = [m for m in modules if isinstance(m, TAPSLayer)]
        handles = []
        if adapter_names is not None:
            adapter_names = self._check_adapter_names(adapter_names, layers)
            for m in modules:
                if isinstance(m, TAPSLayer):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                    handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
                elif isinstance(m, ModulesToSaveWrapper):  # heads and norms (PEFT's own routing skips norm layers)
                    handles.append(m.register_forward_hook(partial(_route_samples, adapter_names=adapter_names)))
        names = self.active_adapters if adapter_names is None else list(dict.fromkeys(adapter_names))
        gates: dict[TAPSLayer, dict[str, bool]] = {}
        try:
            gates = {} if torch.compiler.is_compiling() else _read_gates(layers, names)
            for layer, layer_gates in gates.items():
                layer._gates = layer_gates
            yield
        finally:
            for layer in gates:
                layer._gates = None
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
        unknown = set(adapter_names) - {"__base__"} - set(self.peft_config)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}. "
                f"Loaded adapters: {', '.join(self.peft_config)} (or '__base__' for the base model)."
            )
        return list(adapter_names)

    # ----- adapters on disk hold only the active deltas (PEFT's state-dict hooks) -----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, minus each delta whose score (read from the state dict itself) is below tau, unless
        ``config.save_inactive_deltas`` (resumable training checkpoints). The config's ``base_model_info`` is brought
        up to date here: PEFT saves the config next."""
        from ..hub.identity import base_identity

        config.base_model_info = base_identity(model, config, adapter_name)  # PEFT saves the config right after
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_inactive_deltas:
            return selected
        suffix, scores = f".taps_delta.{adapter_name}", f".taps_scores.{adapter_name}"
        for key in [k for k in selected if k.endswith(scores)]:
            delta = key[: -len(scores)] + suffix
            if float(selected[key].float().max()) < config.tau:
                selected.pop(delta, None)
            elif delta not in selected:  # open, but loaded for inference when it was closed: its delta is zero
                layer = model.get_submodule(key[: -len(scores)])
                selected[delta] = torch.zeros_like(layer.get_base_layer().weight)
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key mapping, then: a file that does not fit the model's layers, or holds NaN/inf, is refused before
        anything is loaded; an inactive layer's delta (absent from the file) becomes real zeros for an adapter that may
        train, and is dropped from the layer for one loaded for inference (it holds memory only for active layers); a
        layer that holds no delta yet (closed when loaded for inference) gets one when the file has it."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, TAPSLayer) and adapter_name in m.taps_scores}
        regrown = {}
        for key in [k for k in remapped if k.endswith(".taps_delta")]:
            stem = key[: -len(".taps_delta")]
            name = stem if stem in layers else stem.removeprefix("base_model.model.")
            if name in layers and adapter_name not in layers[name].taps_delta:
                regrown[name] = remapped.pop(key)
        orphans = sorted(k for k in remapped if k.endswith((".taps_delta", ".taps_scores")))
        orphans += [n for n, v in regrown.items() if v.shape != layers[n].get_base_layer().weight.shape]
        if orphans:
            raise ValueError(
                f"TAPS adapter '{adapter_name}' does not fit this base model: {len(orphans)} saved layer(s) have no "
                f"matching module, e.g. `{orphans[0]}`. Load the adapter onto the base model it was trained from."
            )
        broken = [k for k, v in [*remapped.items(), *regrown.items()] if v.is_floating_point() and not v.isfinite().all()]
        if broken:
            raise ValueError(
                f"TAPS adapter '{adapter_name}' holds NaN/inf values in {len(broken)} tensor(s), e.g. `{broken[0]}`: "
                "it is broken (it diverged in training, or the file was damaged). Load an earlier checkpoint."
            )
        absent = []
        for name, module in layers.items():
            score = remapped.get(f"{name}.taps_scores.{adapter_name}")
            if score is None:
                raise ValueError(
                    f"TAPS adapter '{adapter_name}' does not fit this base model: the weights have no score for the "
                    f"layer `{name}` (every TAPS adapter saves all its scores). Load the adapter onto the base model "
                    "it was trained from, with the weights saved with it."
                )
            key = f"{name}.taps_delta.{adapter_name}"
            if key in remapped or name in regrown:
                continue
            if float(score.float().max()) >= module.taps_tau[adapter_name]:
                raise ValueError(
                    f"TAPS adapter '{adapter_name}' is incomplete: the layer `{name}` is active (score "
                    f"{float(score.float().max()):.4f} >= tau) but the weights hold no delta for it. Save the adapter "
                    "again with save_pretrained."
                )
            absent.append((module, key))
        for name, value in regrown.items():  # every check passed: now the layers may change
            module = layers[name]
            weight = module.get_base_layer().weight
            trainable = module.taps_scores[adapter_name].requires_grad
            module.taps_delta[adapter_name] = nn.Parameter(torch.zeros_like(weight), requires_grad=trainable)
            remapped[f"{name}.taps_delta.{adapter_name}"] = value
        for module, key in absent:
            if config.inference_mode:
                if adapter_name in module.taps_delta:
                    del module.taps_delta[adapter_name]
            elif adapter_name in module.taps_delta:
                param = module.taps_delta[adapter_name]
                remapped[key] = torch.zeros(param.shape, dtype=param.dtype, device=module.get_base_layer().weight.device)
        return remapped

    # ----- PEFT's adapter management, visiting only the tuner modules -----
    # PEFT's set_adapter / merge_adapter / unmerge_adapter walk every module, including each adapter's head and norm
    # copies, and touch every adapter in every layer: with 50 adapters loaded a switch took 9.0 ms instead of 0.8 ms
    # (benchmarks/bench_switch.py). These versions do the same work on the tuner modules only.

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, in a time that does not grow with the adapters loaded."""
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

    # ----- the paper's penalty and the gate report -----

    def taps_layers(self) -> list[tuple[str, TAPSLayer]]:
        """Every TAPS layer of the model, as (module name, layer)."""
        return [(n, m) for n, m in _tuner_modules(self.model, with_names=True) if isinstance(m, TAPSLayer)]

    def freeze_gates(self) -> None:
        """Fix the active adapters' gates for the rest of training, so no gate flips in the last steps: the scores
        stop training, a closed layer computes like its base layer (no delta, no weight gradient: a cheaper step) and
        an open one keeps training its delta. ``set_adapter`` makes the scores trainable again. Under DDP the closed
        layers' deltas then get no gradient: wrap with ``find_unused_parameters=True`` (``taps-peft train`` does).

        Example:
            >>> if step == int(0.8 * total_steps):  # doctest: +SKIP
            ...     model.freeze_gates()
        """
        for _, layer in self.taps_layers():
            for name in self.active_adapters:
                if name in layer.taps_scores:
                    layer.taps_scores[name].requires_grad_(False)

    def taps_penalty(self, step: Optional[int] = None) -> torch.Tensor:
        """``(lam / L) * sum_i |s_i|`` over the gated layers of each active adapter; add it to the task loss.

        ``step`` (optimizer steps so far) enables the warm-up: no penalty while ``step < warmup_steps`` (so a config
        with ``warmup_steps`` needs ``step``). With a budget (``budget_layers`` / ``budget_mib``), each call in training
        first moves ``lam`` by dual ascent (one host read of the gates): up while the active layers exceed the budget,
        down (to 0 at least) while they are within it.

        Example:
            >>> loss = F.cross_entropy(model(x), y) + model.taps_penalty(step)  # doctest: +SKIP
        """
        total: Optional[torch.Tensor] = None
        layers = [m for _, m in self.taps_layers()]
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.warmup_steps and step is None:
                raise ValueError(
                    f"taps_penalty() needs the step: adapter '{name}' has warmup_steps={config.warmup_steps}. Call "
                    "model.taps_penalty(step) with the number of optimizer steps done so far."
                )
            scores = [_full_tensor(m.taps_scores[name]) for m in layers if name in m.taps_scores]
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
        rows = [r for r in self.taps_layer_report(adapter_name) if r["active"]]
        return {"layers": len(rows), "mib": sum(r["bytes"] for r in rows) / 2**20}

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
        """One row per gated layer: ``name``, ``score``, ``active`` (score >= tau), ``params`` (delta size) and
        ``bytes`` (the delta's bytes in the adapter file when active). All scores are read in one transfer.

        Example:
            >>> [r["name"] for r in model.taps_layer_report() if r["active"]]  # doctest: +SKIP
        """
        adapter_name = adapter_name or self.active_adapters[0]
        layers = [(n, m) for n, m in self.taps_layers() if adapter_name in m.taps_scores]
        scores = _host_values([_full_tensor(m.taps_scores[adapter_name]) for _, m in layers])
        rows = []
        for (name, layer), score in zip(layers, scores):
            weight = layer.get_base_layer().weight
            rows.append({
                "name": name,
                "score": score,
                "active": score >= layer.taps_tau[adapter_name],
                "params": weight.numel(),
                "bytes": weight.numel() * weight.element_size(),
            })
        return rows

    def taps_summary(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """Active layers k/L, task-specific parameters (active deltas, scores, norms, head) and adapter bytes."""
        adapter_name = adapter_name or self.active_adapters[0]
        report = self.taps_layer_report(adapter_name)
        active = [r for r in report if r["active"]]
        saved = [
            t
            for m in _tuner_modules(self.model)
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
            for t in m.modules_to_save[adapter_name].state_dict().values()
        ]
        saved_params = sum(t.numel() for t in saved if t.is_floating_point())
        task_params = sum(r["params"] for r in active) + len(report) + saved_params
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
            "adapter_bytes": sum(r["bytes"] for r in active) + 4 * len(report) + sum(t.nbytes for t in saved),
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


def _host_values(tensors: list[torch.Tensor]) -> list[float]:
    """The values of 1-element tensors, read in one device-to-host transfer."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.cat([t.detach().float().reshape(1).to(device) for t in tensors]).tolist()


def _read_gates(layers: list[TAPSLayer], names: list[str]) -> dict[TAPSLayer, dict[str, bool]]:
    """The gates of ``names`` in every layer, read in one transfer; none while the gates are learning (grad enabled
    and a trainable score) or sharded (FSDP2: the layer's forward sees them whole)."""
    pairs = [(m, a) for m in layers for a in names if a in m.taps_scores and not _is_sharded(m.taps_scores[a])]
    if not pairs or (torch.is_grad_enabled() and any(m.taps_scores[a].requires_grad for m, a in pairs)):
        return {}
    gates: dict[TAPSLayer, dict[str, bool]] = {}
    for (m, a), value in zip(pairs, _host_values([m.taps_scores[a] for m, a in pairs])):
        gates.setdefault(m, {})[a] = value >= m.taps_tau[a]
    return gates


def _frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
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


def _base_param_count(model: nn.Module) -> int:
    """Parameters of the base model alone (no deltas, scores or per-adapter copies)."""
    extra = set()
    for m in _tuner_modules(model):
        if isinstance(m, TAPSLayer):
            extra |= {id(p) for p in [*m.taps_delta.values(), *m.taps_scores.values()]}
        elif isinstance(m, ModulesToSaveWrapper):
            extra |= {id(p) for p in m.modules_to_save.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in extra)


def _tuner_modules(model: nn.Module, with_names: bool = False) -> list[Any]:
    """The TAPS layers and head/norm wrappers of ``model`` (or (name, module) pairs), without walking into them (a
    wrapper holds a copy of its module per adapter)."""
    found, stack = [], [("", model)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, (TAPSLayer, AuxiliaryTrainingWrapper)):
            found.append((name, module) if with_names else module)
        else:
            prefix = f"{name}." if name else ""
            stack.extend((prefix + n, m) for n, m in reversed(module._modules.items()) if m is not None)
    return found


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _route_samples(wrapper: ModulesToSaveWrapper, args: tuple, output: torch.Tensor, adapter_names: list[str]):
    """Forward hook: recompute a head/norm output so each sample uses its own task's copy (``__base__``: the
    original module). Heads and norms are cheap next to the gated layers."""
    check_batch_names(output, adapter_names)
    out = output.clone()
    for name, rows in sample_groups(adapter_names, output.device):
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out.index_copy_(0, rows, module(args[0].index_select(0, rows), *args[1:]))
    return out
