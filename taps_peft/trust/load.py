"""The checks a load makes, entered through the tuner's PEFT hooks: for a config read with
``TAPSConfig.from_pretrained``, what PEFT's own reader needs, before any module is replaced (:func:`prepare_load`: the
file's header only); then, in PEFT's ``_remap_adapter_state_dict_for_load`` hook, the tensors PEFT read, before any is
loaded (:func:`check_load`). A failure there undoes the injection (:func:`undo_injection`), so a failed load leaves the
model as it was.

Example:
    >>> PeftModel.from_pretrained(base, "runs/birds")  # checked here, through TAPSModel's hooks  # doctest: +SKIP
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..tuner.layer import DELTA_PARAMS, TAPSLayer, delta_shapes, restart_delta
from ..tuner.targets import planned_targets, plain_modules, saved_modules
from .saves import WEIGHTS_NAME, check_digest, tensors_digest
from .identity import base_fingerprint, check_identity
from .state import notes
_PREFIX = "base_model.model."  # PEFT's prefix of every key in a PeftModel's state dict
_DELTA_SUFFIXES = tuple(f".{p}" for p in DELTA_PARAMS)
_LAYER_SUFFIXES = (*_DELTA_SUFFIXES, ".taps_scores")


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file, refusing a damaged file or NaN/inf values with the file named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(_damaged(path, err)) from None
    check_finite(tensors, path)
    return tensors


def header_names(path: str) -> list[str]:
    """The tensor names of a safetensors file, from its header alone (no tensor is read); a truncated or corrupted
    file is refused with the file named."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(_damaged(path, err)) from None


def _damaged(path: str, err: Exception) -> str:
    return (f"The TAPS adapter file '{path}' is not a valid safetensors file ({err}): it is truncated or corrupted. "
            "Save or download the adapter again.")


def check_finite(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Refuse NaN/inf values in an adapter's tensors, naming the file and the first tensor that holds them."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"The TAPS adapter file '{path}' holds {bad} NaN/inf value(s) in `{key}`: the adapter is broken (it "
                "diverged in training, or the file was damaged). Load an earlier checkpoint."
            )


def saved_module_tensors(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the modules ``config.modules_to_save`` wraps in ``model`` (head and norms), by the name its
    copy has in a saved adapter."""
    modules = plain_modules(model)
    return {f"{name}.{key}": tensor for found in saved_modules(model, config.modules_to_save).values()
            for name in found for key, tensor in modules[name].state_dict().items()}


def check_saved_adapter(model: nn.Module, config, tensors: dict[str, torch.Tensor]) -> None:
    """Check a saved adapter's tensors against the layers ``config`` gates in ``model`` and its ``modules_to_save``,
    before anything is loaded. Every gated layer needs its score, an active one (score >= tau) its delta (or both
    factors A, B with ``config.r``); deltas, factors, head and norms need the model's shapes; the file may hold nothing
    else (no base weight, no layer the adapter does not declare)."""
    modules = plain_modules(model)
    targets = planned_targets(model, config, config.target_modules)
    saved = _as_model_names({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, modules)
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    problems: list[str] = [f"`{k}` is {v.dtype}, not floating point" for k, v in saved.items()
                           if ".taps_" in f".{k}" and not v.is_floating_point()]
    allowed: set[str] = set()
    for name in targets:
        expected = delta_shapes(modules[name], config)
        allowed |= {f"{name}.taps_scores", *(f"{name}.{p}" for p in DELTA_PARAMS)}
        held = [p for p in expected if f"{name}.{p}" in shapes]
        if shapes.get(f"{name}.taps_scores") != (1,):
            problems.append(f"the file has no score for the layer `{name}`")
        elif len(held) < len(expected) and float(saved[f"{name}.taps_scores"].float()) >= config.tau:
            problems.append(f"the adapter is incomplete: the layer `{name}` is active (score >= tau) but has no delta")
        elif held and len(held) < len(expected):
            problems.append(f"the adapter is incomplete: the layer `{name}` has only one of its factors A, B")
        for p, shape in expected.items():
            got = shapes.get(f"{name}.{p}")
            if got is not None and got != shape:
                what = "the delta" if p == "taps_delta" else f"the factor {p[-1]}"
                needs = "the layer's weight has shape" if p == "taps_delta" else f"rank {config.r} there needs"
                problems.append(f"{what} for `{name}` has shape {got} but {needs} {shape}")
        other = [p for p in DELTA_PARAMS if p not in expected and f"{name}.{p}" in shapes]
        if other:
            form = "full-size delta" if "taps_delta" in expected else f"factors A, B of rank {config.r}"
            problems.append(f"the file holds `{name}.{other[0]}` but the adapter's config (r={config.r}) gives that "
                            f"layer a {form}: config and weights were saved with different r")
    for key, tensor in saved_module_tensors(model, config).items():
        allowed.add(key)
        got = shapes.get(key)
        if got is None:
            problems.append(f"the file has no `{key}`")
        elif got != tuple(tensor.shape):
            problems.append(f"`{key}` has shape {got} in the file but {tuple(tensor.shape)} here")
    stray = sorted(set(shapes) - allowed)
    layers = [k for k in stray if k.endswith(_LAYER_SUFFIXES)]
    problems += [f"the saved layer `{k}` has no matching module" for k in dict.fromkeys(k.rpartition(".")[0] for k in layers)]
    others = [k for k in stray if k not in layers]
    if others:
        problems.append(
            f"{len(others)} tensor(s) belong to no layer or module the adapter declares (e.g. `{others[0]}`): an "
            "adapter may hold only the deltas and scores of its target_modules and its modules_to_save"
        )
    if problems:
        raise ValueError(
            f"The TAPS adapter does not fit this base model ({type(model).__name__}): {len(problems)} problem(s): "
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Load the adapter onto the base model "
            "it was trained from (same architecture and number of classes; its README shows how to build it)."
        )


def _as_model_names(shapes: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, Any]:
    """The file's tensor names in the model's naming: when the model holds the same network under another parent (a
    wrapper; loaded with PEFT's ``key_mapping``), the parent's prefix is found from the modules the file names that
    end exactly one module name of the model, and put before every name the model lacks."""
    missing = {key.rpartition(".")[0] for key in shapes} - set(modules)
    prefixes = set()
    for module in missing:
        found = [n for n in modules if n.endswith("." + module)]
        if len(found) == 1:
            prefixes.add(found[0][: -len(module)])
    if len(prefixes) != 1:
        return shapes
    prefix = prefixes.pop()
    return {(prefix + key if key.rpartition(".")[0] in missing else key): value for key, value in shapes.items()}


def check_readable(model: nn.Module, config: Any) -> Optional[str]:
    """For a config read with ``TAPSConfig.from_pretrained`` (its adapter may be loading), before any module is
    replaced: what PEFT's own reading of the weights needs, where a failure would come before the tuner's load hook
    and so could not be undone. The weights file is there and is safetensors (never a pickle), its header is whole,
    and it names every tensor of the head and norm copies (PEFT looks those up before the hook). Only the header is
    read; the load itself checks the rest (``check_first_load``), so a config reused to train a new adapter on
    another base (another head size) is not refused. Returns the file's path, or None when there are no weights."""
    path = source_weights(notes(config).get("source"), bool(config.weights_digest))
    if path is None:
        return None
    modules = plain_modules(model)
    keys = header_names(path)
    bare = [k for k in keys if not k.startswith(_PREFIX)]
    if bare:  # PEFT looks every tensor up under its prefix: such a file would fail half-way through the load
        raise ValueError(
            f"The TAPS adapter file '{path}' has {len(bare)} tensor name(s) without PEFT's `{_PREFIX}` prefix (e.g. "
            f"`{bare[0]}`): it was not written by save_pretrained, and PEFT cannot load it. Nothing was loaded; save "
            f"the adapter with save_pretrained, or add the prefix to every name (save_file({{'{_PREFIX}' + k: v for "
            "k, v in tensors.items()}, path)) and save its config again."
        )
    names = _as_model_names({k.removeprefix(_PREFIX): None for k in keys}, modules)
    missing = sorted(set(saved_module_tensors(model, config)) - set(names))
    if missing:  # the full checks say why (two saves, an incomplete adapter, another base)
        tensors = read_weights(path)
        if config.weights_digest:
            check_digest(config.weights_digest, tensors_digest(tensors.values()), config, path)
        check_saved_adapter(model, config, tensors)
        raise ValueError(f"The TAPS adapter file '{path}' has no `{missing[0]}` ({len(missing)} head or norm "
                         "tensor(s) missing). Nothing was loaded; save the adapter again with save_pretrained.")
    return path


def spend_binding(tuner: Any, config: Any, adapter_name: str) -> Optional[dict]:
    """Whether this load is the one an injection for a saved adapter's config (``weights_digest`` set: read with
    ``TAPSConfig.from_pretrained``, or a copy of one) was made for, with the adapter's tensors as injection left them.
    Returns what the load checks (``weights_digest``, the file when known, the injection to undo), else None. The
    binding serves one load only: once the adapter changed (it trained, or loaded), a later load (a Trainer resuming,
    ``set_peft_model_state_dict``) is not compared with it."""
    entry = tuner.__dict__.get("_taps_loads", {}).pop(adapter_name, None) if tuner is not None else None
    digest = config.weights_digest
    if entry is None or not digest:
        return None
    config.weights_digest = None
    if entry["versions"] != adapter_versions(tuner.model, adapter_name):
        return None
    path = notes(config).pop("weights_path", None) or "the folder it is loaded from"
    return {"path": path, "digest": digest, "injected": entry["injected"]}


def check_first_load(model: nn.Module, config: Any, adapter_name: str, state_dict: dict, binding: dict) -> None:
    """The checks of a saved adapter's load (``binding`` from :func:`spend_binding`), on the tensors PEFT read (the
    tuner's load hook): finite, the ones saved with the config (not a file replaced while it was read, or weights of
    another save), fitting ``model`` (``check_saved_adapter``), and a base with the weights the adapter was trained on
    (a mismatch warns: :class:`BaseModelMismatchWarning`; the adapter then keeps the trained-on base's identity)."""
    tensors = {k.replace(f".modules_to_save.{adapter_name}.", "."): v for k, v in state_dict.items()}  # as saved
    check_finite(tensors, binding["path"])
    try:
        check_digest(binding["digest"], tensors_digest(tensors.values()), config, binding["path"])
    except ValueError as err:
        if "mixes two saves" not in str(err):
            raise
        raise ValueError(f"{err} (To load other weights into a model built from a config read with "
                         "TAPSConfig.from_pretrained, build it from dataclasses.replace(config, weights_digest=None).)"
                         ) from None
    base = model.get_base_model()
    check_saved_adapter(base, config, tensors)
    now = {"fingerprint": base_fingerprint(base, config)}
    if check_identity(config.base_model_info or {}, now, adapter_name):
        model.base_model.__dict__.setdefault("_kept_identity", set()).add(adapter_name)  # see record_at_save


def adapter_versions(model: nn.Module, adapter_name: str) -> tuple[int, ...]:
    """The version counters of the adapter's tensors (deltas, factors, scores, head and norm copies): every in-place
    change (an optimizer step, a load) moves them, so equal counters mean the adapter is as injection left it."""
    params = []
    for module in model.modules():
        if isinstance(module, TAPSLayer):
            params += module.adapter_params(adapter_name)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            params += list(module.modules_to_save[adapter_name].parameters())
    return tuple(p._version for p in params)


def check_loaded_state(model: nn.Module, config: Any, adapter_name: str, remapped: dict) -> dict:
    """Refuse, before anything is loaded, weights that are not this adapter's: holding tensors of anything but its
    own layers, head and norms, lacking a score, a head or norm tensor or an active layer's delta (or one of its
    factors A, B with ``config.r``), not fitting the model, or NaN/inf. Then an inactive layer's delta (absent from
    the file) becomes a zero delta (``restart_delta``) for an adapter that may train, and is dropped from the layer
    for one loaded for inference (it holds memory only for active layers); a layer that holds no delta yet (closed
    when loaded for inference) gets one when the file has it."""
    remapped = {k.removeprefix(_PREFIX): v for k, v in remapped.items()}
    modules = {n.removeprefix(_PREFIX): m for n, m in model.named_modules()}
    layers = {n: m for n, m in modules.items() if isinstance(m, TAPSLayer) and adapter_name in m.taps_scores}
    expected = {n: delta_shapes(m.get_base_layer(), config) for n, m in layers.items()}
    copies = {f"{n}.modules_to_save.{adapter_name}.{k}": v for n, m in modules.items()
              if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
              for k, v in m.modules_to_save[adapter_name].state_dict().items()}
    own = {f"{n}.{p}.{adapter_name}" for n in layers for p in (*DELTA_PARAMS, "taps_scores")} | set(copies)
    stray = sorted(k for k in remapped if k not in own and not k.endswith(_LAYER_SUFFIXES))
    _refuse(adapter_name, "holds tensors of modules the adapter does not declare", stray,
            "an adapter may hold only the deltas and scores of its target_modules and its modules_to_save")
    _refuse(adapter_name, "lacks tensors of its head or norms", sorted(set(copies) - set(remapped)),
            "save the adapter again with save_pretrained")
    regrown, other_form = {}, []
    for key in [k for k in remapped if k.endswith(_DELTA_SUFFIXES)]:  # unmapped: the layer holds no such delta
        name, _, param = key.rpartition(".")
        if name in layers and param in expected[name] and adapter_name not in getattr(layers[name], param):
            regrown[(name, param)] = remapped.pop(key)
        elif name in layers:
            other_form.append(key)
    held = {(n, p): remapped[f"{n}.{p}.{adapter_name}"] for n in layers for p in DELTA_PARAMS
            if f"{n}.{p}.{adapter_name}" in remapped}
    other_form += [f"{n}.{p}" for n, p in held if p not in expected[n]]
    _refuse(adapter_name, f"holds deltas of another form than its config gives (r={config.r}: full-size deltas, or "
            "factors A, B)", sorted(other_form), "load it with the adapter_config.json saved with its weights")
    orphans = sorted(k for k in remapped if k.endswith(_LAYER_SUFFIXES))
    orphans += [f"{n}.{p}" for (n, p), v in {**held, **regrown}.items() if tuple(v.shape) != expected[n][p]]
    _refuse(adapter_name, "does not fit this base model: saved layer(s) have no matching module or shape", orphans,
            "load the adapter onto the base model it was trained from")
    shapes = [k for k, v in remapped.items() if k in copies and v.shape != copies[k].shape]
    _refuse(adapter_name, "does not fit this base model: head or norm tensors of another shape", shapes,
            "load the adapter onto the base model it was trained from (same number of classes)")
    _refuse(adapter_name, "holds TAPS tensors that are not floating point", sorted(
        k for k, v in [*remapped.items(), *regrown.items()] if ".taps_" in f".{k}" and not v.is_floating_point()),
        "save the adapter again with save_pretrained")
    broken = [k for k, v in [*remapped.items(), *regrown.items()] if v.is_floating_point() and not v.isfinite().all()]
    _refuse(adapter_name, "holds NaN/inf values (it diverged in training, or the file was damaged)", broken,
            "load an earlier checkpoint")
    absent = []
    for name, module in layers.items():
        score = remapped.get(f"{name}.taps_scores.{adapter_name}")
        _refuse(adapter_name, "does not fit this base model: no score for a gated layer", [name] if score is None
                else [], "load the adapter onto the base model it was trained from, with the weights saved with it")
        have = [p for p in expected[name] if f"{name}.{p}.{adapter_name}" in remapped or (name, p) in regrown]
        if len(have) == len(expected[name]):
            continue
        _refuse(adapter_name, "is incomplete: a layer has only one of its factors A, B", [name] if have else [],
                "save the adapter again with save_pretrained")
        if float(score.float().max()) >= module.taps_tau[adapter_name]:
            _refuse(adapter_name, "is incomplete: an active layer (score >= tau) has no delta", [name],
                    "save the adapter again with save_pretrained")
        absent.append((name, module))
    for (name, param), value in regrown.items():  # every check passed: now the layers may change
        module = layers[name]
        trainable = module.taps_scores[adapter_name].requires_grad
        getattr(module, param)[adapter_name] = nn.Parameter(torch.zeros_like(value), requires_grad=trainable)
        remapped[f"{name}.{param}.{adapter_name}"] = value
    for name, module in absent:
        if config.inference_mode:
            for params in (module.taps_delta, module.taps_A, module.taps_B):
                if adapter_name in params:
                    del params[adapter_name]
        elif module.has_delta(adapter_name):
            for param, value in restart_delta(module, config, adapter_name).items():
                remapped[f"{name}.{param}.{adapter_name}"] = value
    return {_PREFIX + k: v for k, v in remapped.items()} if _prefixed(model) else remapped


def _refuse(adapter_name: str, problem: str, names: list[str], fix: str) -> None:
    if names:
        raise ValueError(
            f"TAPS adapter '{adapter_name}' {problem}: {len(names)} tensor(s) or layer(s), e.g. `{names[0]}`. Nothing "
            f"was loaded; {fix}."
        )


def _prefixed(model: nn.Module) -> bool:
    return any(n.startswith(_PREFIX) for n, _ in model.named_parameters())


def source_weights(source: Optional[dict], saved_with_weights: bool) -> Optional[str]:
    """The local path of the weights of an adapter read by ``TAPSConfig.from_pretrained`` (a folder, or the same Hub
    revision, downloaded once: PEFT's own load then reads the cached file); None for a config saved on its own (no
    ``weights_digest``) in a folder without weights. A folder with only ``adapter_model.bin`` is refused: taps_peft
    never unpickles."""
    if source is None:
        return None
    where = os.path.join(source["model_id"], source["subfolder"]) if source["subfolder"] else source["model_id"]
    if os.path.isdir(where):
        if os.path.isfile(os.path.join(where, WEIGHTS_NAME)):
            return os.path.join(where, WEIGHTS_NAME)
        if os.path.isfile(os.path.join(where, "adapter_model.bin")):
            raise ValueError(_PICKLE_REFUSED.format(where=where))
        if saved_with_weights:
            raise FileNotFoundError(
                f"No {WEIGHTS_NAME} in '{where}' (it has {sorted(os.listdir(where))}), though its adapter_config.json "
                "was saved with one: the adapter's weights are missing. Save the adapter again, or copy the file back."
            )
        return None
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(source["model_id"], WEIGHTS_NAME, subfolder=source["subfolder"], **source["hub"])
    except EntryNotFoundError:
        hub = {k: v for k, v in source["hub"].items() if k in ("revision", "token")}
        prefix = f"{source['subfolder']}/" if source["subfolder"] else ""
        listed = set(list_repo_files(source["model_id"], **hub))
        if prefix + WEIGHTS_NAME in listed:
            raise ValueError(
                f"The Hub repo '{where}' lists {WEIGHTS_NAME} but answered 404 when downloading it: taps_peft never "
                "falls back to a pickled adapter_model.bin. Check the repo (and its revision), then try again."
            ) from None
        if prefix + "adapter_model.bin" in listed:
            raise ValueError(_PICKLE_REFUSED.format(where=where)) from None
        raise FileNotFoundError(
            f"The Hub repo '{where}' has no {WEIGHTS_NAME}: the adapter's weights are missing. Check the repo (and "
            "its revision), then try again."
        ) from None


_PICKLE_REFUSED = (
    "TAPS adapters are loaded from safetensors only, and '{where}' has no adapter_model.safetensors: taps_peft never "
    "unpickles an adapter file such as adapter_model.bin. Save the adapter with save_pretrained, or, if you trust the "
    "pickle, convert it once with safetensors.torch.save_file."
)


def check_adapter_name(name: Any) -> str:
    """An adapter name becomes a folder name (``save_pretrained`` writes ``<dir>/<name>/``): no path separators, no
    ``..``, not absolute, not empty. Raises a ValueError naming the fix."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name):
        raise ValueError(
            f"adapter_name={name!r} is invalid: an adapter name is also a folder name in save_pretrained "
            "(<dir>/<adapter_name>/), so it may not be empty, '.' or '..', an absolute path, or hold '/' or '\\'. "
            "Use a plain name such as 'birds'."
        )
    return name


# ----- entered from the tuner's PEFT hooks -----


def prepare_load(model: nn.Module, config: Any) -> None:
    """``TAPSModel._prepare_adapter_config``: for a config read with ``TAPSConfig.from_pretrained`` (a saved adapter
    may be loading), its weights file must be readable by PEFT (:func:`check_readable`) before any module is replaced;
    the path is kept for the load's messages."""
    path = check_readable(model, config)
    if path is not None:
        notes(config)["weights_path"] = path


@contextmanager
def injecting(tuner: Any, model: nn.Module, adapter_name: str, config: Any) -> Iterator[None]:
    """Around PEFT's injection of ``adapter_name``: for a saved adapter's config (``weights_digest`` set), note on the
    tuner what the injection changes in ``model`` besides its modules, to undo it if the load fails
    (:func:`undo_injection`), and the adapter's tensor versions after it, so its first load can tell it is the first
    (:func:`spend_binding`). Kept on the tuner, per adapter (copied and pickled with the model); dropped by its load,
    the next injection under that name, or a failed injection."""
    loads = tuner.__dict__.setdefault("_taps_loads", {})
    loads.pop(adapter_name, None)
    tuner.__dict__.setdefault("_kept_identity", set()).discard(adapter_name)  # a new adapter under an old name
    if not config.weights_digest:
        yield
        return
    injected = {"grads": [(p, p.requires_grad) for p in model.parameters()],
                "modes": [(m, m.training) for m in model.modules()],
                "peft_config": "peft_config" in vars(model),
                "input_grads": bool(getattr(model, "_require_grads_hooks", None))}
    yield
    loads[adapter_name] = {"injected": injected, "versions": adapter_versions(tuner.model, adapter_name)}


def undo_injection(tuner: Any, adapter_name: str, before: dict[str, Any]) -> None:
    """Remove an adapter whose load failed after PEFT injected it: PEFT's ``delete_adapter``, then every TAPS layer and
    head/norm wrapper left without an adapter is its module again, and flags, modes and attributes are as ``before``.
    The first adapter of a model gives the user's base back exactly."""
    from ..batchnorm import release_norms
    from ..tuner.model import tuner_modules
    from ..scores import remove_loss_hook

    tuner.delete_adapter(adapter_name)
    for name, module in tuner_modules(tuner.model, with_names=True):
        if isinstance(module, TAPSLayer) and not module.taps_scores:
            original = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
            original = module.original_module
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(tuner.model.get_submodule(parent), child, original)
    for param, flag in before["grads"]:
        param.requires_grad_(flag)
    for module, mode in before["modes"]:
        module.training = mode
    if not tuner.peft_config:
        remove_loss_hook(tuner.model)
        release_norms(tuner.model)
        if not before["peft_config"]:
            vars(tuner.model).pop("peft_config", None)
        if not before["input_grads"] and getattr(tuner.model, "_require_grads_hooks", None):
            tuner.model.disable_input_require_grads()


def check_load(model: nn.Module, config: Any, adapter_name: str, state_dict: dict, remap: Any) -> dict:
    """``TAPSModel._remap_adapter_state_dict_for_load``: the load a saved adapter's config was injected for is checked
    against that save (:func:`check_first_load`); ``remap`` (PEFT's key mapping) runs, and weights that are not this
    adapter's are refused (:func:`check_loaded_state`), all before anything is loaded. If a check fails the injection
    is undone: ``PeftModel.from_pretrained`` leaves the base as it was, ``load_adapter`` adds no adapter."""
    tuner = getattr(model, "base_model", None)
    binding = spend_binding(tuner, config, adapter_name)
    try:
        if binding is not None:
            check_first_load(model, config, adapter_name, state_dict, binding)
        return check_loaded_state(model, config, adapter_name, remap(state_dict))
    except Exception:
        if binding is not None:
            undo_injection(tuner, adapter_name, binding["injected"])
        raise
