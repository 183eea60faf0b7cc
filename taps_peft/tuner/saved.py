"""Saved adapters: their files, how a save binds config and weights together, and the checks a load makes: for a
config read with ``TAPSConfig.from_pretrained``, what PEFT's own reader needs, before any module is replaced
(``check_readable``: the header only); then, in PEFT's ``_remap_adapter_state_dict_for_load`` hook, the tensors PEFT
read, before any is loaded (``check_first_load``, ``check_loaded_state``). A failure there makes the tuner undo the
injection, so a failed load leaves the model as it was."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Optional

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .identity import check_identity
from .layer import TAPSLayer
from .lowrank import factor_shapes, init_factors, layer_scale, lowrank_fits
from .targets import planned_targets, plain_modules, saved_modules

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's prefix of every key in a PeftModel's state dict
DELTA_PARAMS = ("taps_delta", "taps_A", "taps_B")  # a layer's delta: full-size, or low-rank factors (TAPSConfig.r)
_DELTA_SUFFIXES = tuple(f".{p}" for p in DELTA_PARAMS)
_LAYER_SUFFIXES = (*_DELTA_SUFFIXES, ".taps_scores")


def delta_shapes(base: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The delta parameters an adapter with ``config`` gives the (base) layer ``base``, with their shapes: a full
    delta, or factors A and B where ``config.r`` is set and the layer fits.

    Example:
        >>> delta_shapes(nn.Linear(32, 16), TAPSConfig(r=4))  # doctest: +SKIP
        {'taps_A': (4, 32), 'taps_B': (16, 4)}
    """
    if lowrank_fits(base, getattr(config, "r", None)):
        a, b = factor_shapes(base.weight.shape, config.r)
        return {"taps_A": a, "taps_B": b}
    return {"taps_delta": tuple(base.weight.shape)}


def restart_delta(layer: TAPSLayer, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The values a layer's absent (unsaved) delta takes for an adapter that may train: zeros, or for factors B = 0
    and A drawn afresh as LoRA's (reproducibly; A = B = 0 would never learn), so the delta is zero either way. In the
    dtype of what the layer holds for the adapter (its base weight's when nothing)."""
    weight = layer.get_base_layer().weight
    shapes = delta_shapes(layer.get_base_layer(), config)
    held = [getattr(layer, p)[adapter_name] for p in DELTA_PARAMS if adapter_name in getattr(layer, p)]
    dtype = held[0].dtype if held else weight.dtype
    if "taps_delta" in shapes:
        return {"taps_delta": torch.zeros(shapes["taps_delta"], dtype=dtype, device=weight.device)}
    scale = layer_scale(weight, config.r, config.alpha)
    a, b = init_factors(weight, config.r, scale, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return {"taps_A": a, "taps_B": b}


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of a set of tensors (dtype, shape and bytes of each; their names and order do not matter, so the same
    tensors give the same digest in a file and in the state dict PEFT hands to the tuner when loading)."""
    parts = []
    for t in tensors:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
        parts.append(h.digest())
    total = hashlib.blake2b(digest_size=16)
    for part in sorted(parts):
        total.update(part)
    return total.hexdigest()


# The config fields that change what a saved adapter computes: the delta form and scale, the gate threshold, the gated
# layer set. ``weights_digest`` covers them with the tensors, so a hand-edited adapter_config.json is refused.
DIGEST_FIELDS = ("r", "alpha", "tau", "target_modules", "exclude_modules")


def adapter_digest(tensors: str, config: Any) -> str:
    """``weights_digest``: ``<tensors>:<fields>``, the digest of the saved tensors (:func:`tensors_digest`) and one of
    the config's :data:`DIGEST_FIELDS` (``config`` a TAPSConfig or its saved dict; sets and lists compare as sorted
    lists)."""
    def value(name: str) -> Any:
        v = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        return sorted(v) if isinstance(v, (set, frozenset, list, tuple)) else v

    fields = json.dumps({name: value(name) for name in DIGEST_FIELDS}, sort_keys=True)
    return f"{tensors}:{hashlib.blake2b(fields.encode(), digest_size=16).hexdigest()}"


def check_digest(recorded: str, tensors: str, config: Any, where: str) -> None:
    """Refuse weights and a config that ``recorded`` (the config's ``weights_digest``) does not bind together: weights
    of another save (:func:`mixed_save`), or config fields edited after the save. A digest of the weights alone (saved
    before the config fields were covered) is checked against the weights only."""
    saved_tensors, _, _ = recorded.partition(":")
    if saved_tensors != tensors:
        raise ValueError(mixed_save(where))
    if ":" in recorded and recorded != adapter_digest(tensors, config):
        raise ValueError(
            f"The TAPS adapter at '{where}' has an adapter_config.json edited after it was saved: one of "
            f"{', '.join(DIGEST_FIELDS)} differs from the values its weights were trained and saved with, so the "
            "adapter would compute other outputs. Nothing was loaded; restore the saved adapter_config.json (or load "
            "the adapter as saved, change the config in Python and train or save it again)."
        )


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
    path = source_weights(getattr(config, "_source", None), bool(config.weights_digest))
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


def spend_binding(model: nn.Module, config: Any, adapter_name: str) -> Optional[dict]:
    """Whether this load is the one a config read with ``TAPSConfig.from_pretrained`` was injected for: the config is
    bound to a saved adapter's weights and the adapter's tensors are as injection left them. Returns what the load
    checks (the file, ``weights_digest``, the base the adapter was trained on), else None. The binding serves one load
    only: once the adapter changed (it trained, or loaded), a later load (a Trainer resuming,
    ``set_peft_model_state_dict``) is not compared with it."""
    if getattr(config, "_source", None) is None:
        return None
    untouched = getattr(config, "_versions", None) in (None, adapter_versions(model, adapter_name))
    path, saved = config.__dict__.pop("_weights_path", None), config.__dict__.pop("_saved_identity", None)
    digest, config.weights_digest, config._source = config.weights_digest, None, None
    if not untouched or path is None:
        return None
    return {"path": path, "digest": digest, "identity": saved}


def check_first_load(model: nn.Module, config: Any, adapter_name: str, state_dict: dict, binding: dict) -> None:
    """The checks of a saved adapter's load (``binding`` from :func:`spend_binding`), on the tensors PEFT read (the
    tuner's load hook): finite, the ones saved with the config (not a file replaced while it was read, or weights of
    another save), fitting ``model`` (``check_saved_adapter``), and a base with the weights the adapter was trained on
    (a mismatch warns: :class:`BaseModelMismatchWarning`). The adapter then keeps the trained-on base's identity."""
    tensors = {k.replace(f".modules_to_save.{adapter_name}.", "."): v for k, v in state_dict.items()}  # as saved
    check_finite(tensors, binding["path"])
    if binding["digest"]:
        try:
            check_digest(binding["digest"], tensors_digest(tensors.values()), config, binding["path"])
        except ValueError as err:
            if "mixes two saves" not in str(err):
                raise
            raise ValueError(f"{err} (To load other weights into a model built from a config read with "
                             "TAPSConfig.from_pretrained, build it from dataclasses.replace(config).)") from None
    check_saved_adapter(model.get_base_model() if hasattr(model, "get_base_model") else model, config, tensors)
    saved = binding["identity"]
    if saved is not None:
        if check_identity(saved, config.base_model_info or {}, adapter_name) and hasattr(model, "base_model"):
            model.base_model.__dict__.setdefault("_kept_identity", set()).add(adapter_name)  # see check_base_at_save
        if "fingerprint" in saved:
            config.base_model_info["fingerprint"] = saved["fingerprint"]


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


def mixed_save(where: str) -> str:
    return (
        f"The TAPS adapter at '{where}' mixes two saves: its adapter_config.json and its adapter_model.safetensors were "
        "written by different save_pretrained calls (a save interrupted, a file copied from elsewhere, or the folder "
        "rewritten while it was read). Nothing was loaded; save the adapter again (or load it once the save is done)."
    )


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
