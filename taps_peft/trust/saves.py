"""A save's files and how they are bound to each other: ``weights_digest`` in ``adapter_config.json`` is the digest of the tensors
in ``adapter_model.safetensors`` and of the config fields that change outputs, written by ``TAPSConfig.save_pretrained``
right after PEFT wrote the weights (:func:`write_config`). Reading a config (:func:`read_config`) remembers where it came
from (``trust.state``), so the load of its weights can check them against it (``trust.load``): a config and weights of
two different saves, or a config edited by hand, are refused before anything is loaded.

Example:
    >>> write_config(config, "runs/birds")  # what TAPSConfig.save_pretrained does  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from peft.config import PeftConfig
from peft.utils import CONFIG_NAME as PEFT_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType

from ..hub import atomic_write, temporary_name
from .state import notes

WEIGHTS_NAME, CONFIG_NAME = SAFETENSORS_WEIGHTS_NAME, PEFT_CONFIG_NAME  # PEFT's file names


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


def mixed_save(where: str) -> str:
    return (
        f"The TAPS adapter at '{where}' mixes two saves: its adapter_config.json and its adapter_model.safetensors were "
        "written by different save_pretrained calls (a save interrupted, a file copied from elsewhere, or the folder "
        "rewritten while it was read). Nothing was loaded; save the adapter again (or load it once the save is done)."
    )


def file_digest(path: Path) -> str:
    """:func:`tensors_digest` of a safetensors file's tensors."""
    from safetensors.torch import load_file

    return tensors_digest(load_file(str(path)).values())


def read_config(cls: type, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
    """PEFT's ``PeftConfig.from_pretrained`` (reads ``adapter_config.json`` only), refusing another method's
    adapter with its name and a damaged file with its path. The config remembers where it was read from, so that
    loading its weights (``PeftModel.from_pretrained``, ``load_adapter``) checks them against it and the base, and
    a refused load leaves the model as it was; reused for a new adapter (``get_peft_model``), only its folder's
    weights must be readable."""
    where = os.path.join(str(pretrained_model_name_or_path), subfolder) if subfolder else str(
        pretrained_model_name_or_path)
    try:
        config = PeftConfig.from_pretrained.__func__(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"The adapter config '{os.path.join(where, CONFIG_NAME)}' is not valid JSON ({err}): the file is "
            "damaged. Save the adapter again (or restore the file)."
        ) from None
    if not isinstance(config, cls):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(
            f"The adapter at '{where}' is a {kind} adapter, not TAPS (its adapter_config.json says "
            f"peft_type={kind!r}): load it with its own PEFT method."
        )
    pending = interrupted_save(where, config.weights_digest)
    if pending is not None:  # a save killed between its two replacements: its weights are in place, and its config
        config = cls.from_peft_type(**cls.check_kwargs(**{**cls._split_kwargs(kwargs)[1], **pending}))
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
           if kwargs.get(k) is not None}
    notes(config)["source"] = {"model_id": str(pretrained_model_name_or_path), "subfolder": subfolder, "hub": hub}
    return config


def saving(config: Any, model: Any, adapter_name: str) -> None:
    """Note that ``model`` is saving ``config``'s adapter (PEFT's ``save_pretrained`` collects the state dict, then
    saves the config): :func:`write_config` then writes the TAPS model card beside it. A weak reference."""
    import weakref

    notes(config)["card_source"] = (weakref.ref(model), adapter_name)


def write_config(config: Any, save_directory: str, **kwargs: Any) -> None:
    """PEFT's ``PeftConfig.save_pretrained``, written atomically, with ``weights_digest`` set to the digest of the
    ``adapter_model.safetensors`` beside it (PEFT's ``save_pretrained`` writes the weights, then calls this), so a
    later load can tell that config and weights belong to one save. Within ``PeftModel.save_pretrained`` it then
    writes the TAPS model card (``README.md``; a README you wrote keeps its text around the TAPS section)."""
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"Cannot save into '{folder}': it is a file, not a folder. Choose another path.")
    folder.mkdir(parents=True, exist_ok=True)
    weights, pickle = folder / WEIGHTS_NAME, folder / "adapter_model.bin"
    if pickle.exists() and (not weights.exists() or pickle.stat().st_mtime_ns >= weights.stat().st_mtime_ns):
        raise ValueError(
            f"'{pickle}' is a pickle (save_pretrained(safe_serialization=False)): TAPS adapters are loaded from "
            "safetensors only, and taps_peft never unpickles. Save again without safe_serialization=False."
        )
    output = config.to_dict()
    output = {k: sorted(v) if isinstance(v, set) else v for k, v in output.items()}
    for key in ("r", "alpha"):  # full-size deltas: the file stays as it was before low-rank deltas existed
        if output.get(key, 0) is None:
            del output[key]
    auto_mapping = kwargs.pop("auto_mapping_dict", None)
    if auto_mapping is not None:
        output["auto_mapping"] = auto_mapping
    output["weights_digest"] = adapter_digest(file_digest(weights), output) if weights.exists() else None
    atomic_write(folder / CONFIG_NAME, json.dumps(output, indent=2, sort_keys=True))
    model, adapter_name = notes(config).pop("card_source", (lambda: None, None))
    model = model()
    if model is not None and weights.exists() and _card_readable(model):
        from ..hub.card import save_model_card

        save_model_card(model, folder, adapter_name=adapter_name)


def interrupted_save(folder: str, digest: Optional[str]) -> Optional[dict[str, Any]]:
    """The config of a save killed after it replaced the weights and before the config (``save_adapter`` puts the new
    config under its temporary name ``.adapter_config.json.taps-tmp`` first): its attributes when that file is a whole
    TAPS config of another save, bound to the weights now in ``folder``; else None (the config in place holds)."""
    pending, weights = temporary_name(Path(folder) / CONFIG_NAME), Path(folder) / WEIGHTS_NAME
    if not (pending.is_file() and weights.is_file()):
        return None
    try:
        attrs = json.loads(pending.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # a config write killed part-way: not a save
        return None
    if not (isinstance(attrs, dict) and attrs.get("peft_type") == PeftType.TAPS.value
            and attrs.get("weights_digest") not in (None, digest)):
        return None
    try:
        if adapter_digest(file_digest(weights), attrs) != attrs["weights_digest"]:
            return None  # killed before the weights were replaced: the folder holds the old save, whole
    except Exception:  # a damaged weights file: the load itself says so
        return None
    warnings.warn(
        f"A save into '{folder}' was interrupted after it wrote the adapter's weights and before its "
        f"{CONFIG_NAME}: loading the adapter it saved (its config from '{pending.name}'). Save again to complete the "
        "folder.", stacklevel=4,
    )
    return attrs


def _card_readable(model: Any) -> bool:
    """Whether the card can be built from ``model`` here: a PeftModel whose scores are whole (under FSDP2 reading a
    sharded score is a collective, which the saving process alone must not start: PEFT's card stays)."""
    from peft import PeftModel

    from ..tuner.layer import TAPSLayer, is_sharded

    return isinstance(model, PeftModel) and not any(
        is_sharded(p) for m in model.modules() if isinstance(m, TAPSLayer) for p in m.taps_scores.values())

