"""What binds an adapter to its base and its files to each other.

- ``base_model_info`` (in ``TAPSConfig``): the library, architecture, name and classes of the base, and a fingerprint
  of every base tensor the adapter depends on (gated and ungated weights, biases, norms, BatchNorm statistics; not the
  head and norms the adapter replaces with its own). Computed when the adapter is saved (:func:`record_at_save`: the
  base the deltas were trained against, as it is then) and when a saved adapter is loaded (a base with other weights
  warns with :class:`BaseModelMismatchWarning`); never at injection.
- ``weights_digest`` (in ``adapter_config.json``): a digest of the tensors in ``adapter_model.safetensors`` and of the
  config fields that change outputs (``r``, ``alpha``, ``tau``, ``target_modules``, ``exclude_modules``), written by
  ``TAPSConfig.save_pretrained`` right after PEFT wrote the weights (``trust.saves``). Loading refuses a config and
  weights that come from two different saves, and a config edited after the save.

The fingerprint samples up to 1024 values of each tensor spread over all of it (a golden-ratio stride coprime with the
tensor's size, in integer arithmetic: exact for any size, and not lined up with the layout)
and keeps three numbers per tensor: mean, root mean square and a random-sign projection. Two different bases (another
seed or checkpoint, weights scaled, a shifted position embedding) differ by far more than the 1% tolerance; the same base
in bf16 or fp16 differs by about 0.2%.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Iterable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..tuner.targets import find_head, plain_modules, saved_modules

_SAMPLES, _TOLERANCE = 1024, 0.01


class BaseModelMismatchWarning(UserWarning):
    """An adapter is loaded onto a base whose weights differ from the base it was trained on (same shapes).

    Make it an error with ``warnings.filterwarnings("error", category=BaseModelMismatchWarning)``: the load then fails
    before any module of the base is replaced.
    """


# ----- the base -----


def base_tensors(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer of ``model`` as it is without adapters (a TAPS layer stands for its
    base layer, with the weight it had before a merge; a head/norm wrapper for its original module), by its name in the
    plain model, except those under the module names in ``skip``."""
    skip, real, out = tuple(skip), dict(model.named_modules()), {}
    for name, module in plain_modules(model).items():
        wrapper = real[name] if isinstance(real[name], (BaseTunerLayer, AuxiliaryTrainingWrapper)) else None
        # a wrapper's module is listed alone (its children are not): take its tensors with theirs
        tensors = [*module.named_parameters(recurse=wrapper is not None), *module.named_buffers(recurse=wrapper is not None)]
        for key, t in tensors:
            full = f"{name}.{key}" if name else key
            if t is not None and t.is_floating_point() and not any(full == s or full.startswith(s + ".") for s in skip):
                out[full] = t
        unmerged = getattr(wrapper, "_unmerged_weight", None)
        if unmerged is not None and f"{name}.weight" in out:
            out[f"{name}.weight"] = unmerged
    return out


def fingerprint(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, list[float]]]:
    """``{name: [mean, rms, projection]}`` of each tensor's sampled values; None when a tensor is sharded (FSDP2) or on
    the meta device (nothing to read)."""
    if any(hasattr(t, "full_tensor") or t.device.type == "meta" for t in tensors.values()):
        return None
    samples: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors.values():
        flat = t.detach().reshape(-1)
        n = flat.numel()
        k = min(n, _SAMPLES)
        index = (torch.arange(k, dtype=torch.int64, device=flat.device) * _stride(n)) % n  # exact integer arithmetic
        samples.setdefault(flat.device, []).append(flat[index].double())
    host = {d: torch.cat(v).cpu() if v else torch.zeros(0) for d, v in samples.items()}  # one transfer per device
    offsets = {d: 0 for d in host}
    out = {}
    for name, t in tensors.items():
        k = min(t.numel(), _SAMPLES)
        if k == 0:
            continue
        values = host[t.device][offsets[t.device]: offsets[t.device] + k]
        offsets[t.device] += k
        signs = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 2 - 1
        stats = (values.mean(), values.square().mean().sqrt(), (values * signs).sum() / math.sqrt(k))
        out[name] = [float(f"{float(v):.6g}") for v in stats]
    return out


def _stride(n: int) -> int:
    """A step through ``n`` elements that is coprime with ``n`` and near ``n`` times the golden ratio: the samples
    land all over the tensor instead of lining up with its layout (the same kernel tap, every k-th column)."""
    step = max(1, round(n * 0.6180339887498949)) | 1
    while math.gcd(step, n) != 1:
        step += 2
    return step


def differing_tensors(saved: dict[str, list[float]], now: dict[str, list[float]]) -> list[str]:
    """Names whose statistics differ by more than the tolerance (1% of the tensor's rms), or that one side lacks."""
    out = sorted(set(saved) ^ set(now))
    for name in sorted(set(saved) & set(now)):
        a, b = saved[name], now[name]
        tolerance = _TOLERANCE * max(abs(a[1]), abs(b[1])) + 1e-6
        if any(abs(x - y) > tolerance for x, y in zip(a, b)):
            out.append(name)
    return out


def describe_base(model: nn.Module, head: Optional[str]) -> dict[str, Any]:
    """Library, architecture, name, pretrained (when known) and number of classes of a base model."""
    info: dict[str, Any] = {}
    pcfg = getattr(model, "pretrained_cfg", None)
    hf_config = getattr(model, "config", None)
    if isinstance(pcfg, dict) and type(model).__module__.startswith("timm.") and pcfg.get("architecture"):
        info.update(library="timm", architecture=pcfg["architecture"], default_args=_timm_default_args(model, pcfg))
    elif hasattr(hf_config, "model_type") and hasattr(hf_config, "to_dict"):
        checkpoint = getattr(hf_config, "_name_or_path", "") or None
        info.update(library="transformers", architecture=type(model).__name__, model_type=hf_config.model_type)
        if checkpoint:
            info.update(name=checkpoint, pretrained=True)
    else:
        info.update(library="torch", architecture=type(model).__name__)
    if head is not None:
        module = model.get_submodule(head)
        module = getattr(module, "original_module", module)
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        out = getattr(linears[-1], "out_features", None) or getattr(linears[-1], "out_channels", None) if linears else None
        if out is not None:
            info["num_classes"] = int(out)
    return info


def _timm_default_args(model: nn.Module, pcfg: dict) -> bool:
    """Whether ``model`` has the shapes of ``timm.create_model(architecture)`` (head aside): False when it was built
    with other arguments (img_size, depth, ...) that a card could not guess."""
    import timm

    try:
        with torch.device("meta"):
            default = timm.create_model(pcfg["architecture"], pretrained=False,
                                        num_classes=getattr(model, "num_classes", 1000))
    except Exception:  # an architecture timm cannot build by name
        return False
    mine = {k: tuple(v.shape) for k, v in base_tensors(model).items()}
    theirs = {k: tuple(v.shape) for k, v in default.state_dict().items() if v.is_floating_point()}
    return mine == theirs


def check_identity(saved: dict[str, Any], now: dict[str, Any], adapter_name: str) -> bool:
    """Warn (:class:`BaseModelMismatchWarning`) when the base an adapter is loaded onto has other weights than the
    base it was trained on, and say so (True); nothing when either fingerprint is unknown."""
    before, after = saved.get("fingerprint"), now.get("fingerprint")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return False
    differ = differing_tensors(before, after)
    if not differ:
        return False
    name = saved.get("name") or saved.get("architecture")
    warnings.warn(
        f"TAPS adapter '{adapter_name}' was trained on the base `{name}`, and this base has other weights in "
        f"{len(differ)} tensor(s) (e.g. `{differ[0]}`), so the adapter's outputs will not be the trained ones. Load it "
        "onto the base it was trained on (its README shows how to build it); "
        "warnings.filterwarnings('error', category=BaseModelMismatchWarning) makes this an error.",
        BaseModelMismatchWarning,
        stacklevel=2,
    )
    return True


def base_fingerprint(model: nn.Module, config: Any) -> Optional[dict[str, list[float]]]:
    """The fingerprint of the base tensors an adapter with ``config`` depends on in ``model`` (all but those of the
    modules it saves its own copy of), as they are now."""
    replaced = [n for names in saved_modules(model, config.modules_to_save).values() for n in names]
    return fingerprint(base_tensors(model, skip=replaced))


_USER_INFO = ("name", "pretrained", "seed", "model_kwargs", "weights")  # what a script may record about the base


def record_at_save(config: Any, model: nn.Module, adapter_name: str, kept: bool) -> None:
    """At save (PEFT's state-dict hook): record the base as it is now in ``config.base_model_info`` (its description
    and fingerprint, keeping what the script recorded: name, pretrained, seed, ...), the base the deltas were trained
    against. An adapter loaded onto another base than its own (``kept``) keeps the base it was trained on, with a
    warning."""
    info = dict(config.base_model_info or {})
    now = {**describe_base(model, find_head(model)), "fingerprint": base_fingerprint(model, config)}
    if kept:
        differ = differing_tensors(info.get("fingerprint") or {}, now["fingerprint"] or {})
        warnings.warn(
            f"TAPS adapter '{adapter_name}' is saved with the identity of the base it was trained on "
            f"(`{info.get('name') or info.get('architecture')}`), not of this base, which has other weights in "
            f"{len(differ)} tensor(s) (e.g. `{differ[0] if differ else '?'}`).", BaseModelMismatchWarning, stacklevel=4,
        )
        return
    config.base_model_info = {**now, **{k: info[k] for k in _USER_INFO if k in info}}
    config.base_model_info.setdefault("name", now.get("architecture"))
