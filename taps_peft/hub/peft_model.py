"""What a TAPS ``PeftModel`` does on top of PEFT's own methods, and the one seam that gives it those methods.

- ``save_pretrained``: folder-atomic (the whole folder is built aside, then swapped in), safetensors only, with the TAPS
  model card.
- ``push_to_hub``: uploads that folder with its card in one commit (transformers' ``push_to_hub`` would replace the
  card that ``save_pretrained`` wrote).
- ``load_adapter`` (and so ``PeftModel.from_pretrained``): safetensors only, never a pickle, also when a Hub server
  stops serving the file; the file is checked against the model before anything is loaded, and a failure leaves the
  model as it was (a failed ``from_pretrained`` leaves the user's base model as it was).

Why a seam: PEFT 0.21 gives a tuner no reference to the ``PeftModel`` that wraps it, and no hook runs between
``save_pretrained`` and transformers' upload. So ``TAPSModel`` calls :func:`attach_when_wrapped` at the end of its
``__init__``; the hook it installs lives only until ``PeftModel.__init__`` assigns the tuner (its next statement), then
binds these methods to that one ``PeftModel`` instance and removes itself. ``import taps_peft`` installs nothing, and
no other model, LoRA included, is touched.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .atomic import replace_folder

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token", "force_download", "local_files_only",
               "proxies")
_PICKLE_REFUSED = (
    "TAPS adapters are loaded from safetensors only, and '{where}' has no adapter_model.safetensors: taps_peft never "
    "unpickles (torch.load) an adapter file such as adapter_model.bin. Save the adapter with save_pretrained, or, if "
    "you trust the pickle, convert it once with safetensors.torch.save_file."
)


def attach_when_wrapped(tuner: nn.Module) -> None:
    """Give the ``PeftModel`` that is about to wrap ``tuner`` the TAPS methods (see the module docstring)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    ref = weakref.ref(tuner)

    def on_register(parent: nn.Module, name: str, child: nn.Module) -> None:
        if ref() is None or child is ref():
            handle.remove()
            from peft import PeftModel

            if child is ref() and isinstance(parent, PeftModel) and name == "base_model":
                attach(parent)

    handle = register_module_module_registration_hook(on_register)


def attach(model: nn.Module) -> nn.Module:
    """Bind the TAPS ``save_pretrained``, ``push_to_hub``, ``load_adapter`` and ``create_or_update_model_card`` to
    this ``PeftModel`` instance (its class is left alone)."""
    # partials of module-level functions survive deepcopy (rebound to the copy) and pickle, unlike closures
    for name, function in (("save_pretrained", save_pretrained), ("push_to_hub", push_to_hub),
                           ("load_adapter", load_adapter), ("create_or_update_model_card", create_or_update_model_card)):
        setattr(model, name, functools.partial(function, model))
    return model


# ----- saving -----


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """PEFT's ``save_pretrained``, folder-atomic: the whole folder (config, weights, card, one subfolder per extra
    adapter) is written aside and swapped in, so a kill at any moment leaves the old folder or the new one.

    TAPS adapters are safetensors only: ``safe_serialization=False`` (a pickled ``adapter_model.bin``) is overridden
    with a warning rather than refused, so a trainer that passes it still saves its (loadable) adapter."""
    if not kwargs.get("safe_serialization", True):
        warnings.warn(
            f"save_pretrained(safe_serialization={kwargs['safe_serialization']!r}) ignored: TAPS adapters are saved as "
            "safetensors only (adapter_model.safetensors); taps_peft never writes or loads pickled adapters.",
            UserWarning,
            stacklevel=2,
        )
    kwargs["safe_serialization"] = True
    if not kwargs.get("is_main_process", True):
        return type(self).save_pretrained(self, str(save_directory), **kwargs)
    target = Path(save_directory)

    def write(tmp: Path) -> None:
        if (target / "README.md").is_file():  # PEFT updates an existing card rather than replacing it
            shutil.copy2(target / "README.md", tmp)
        type(self).save_pretrained(self, str(tmp), **kwargs)

    replace_folder(target, write)


def create_or_update_model_card(self: nn.Module, output_dir: str) -> None:
    """PEFT's card update (metadata, PEFT version), then the TAPS section."""
    from .card import save_model_card

    type(self).create_or_update_model_card(self, output_dir)
    save_model_card(self, output_dir)


def push_to_hub(
    self: nn.Module,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[bool | str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
):
    """``PushToHubMixin.push_to_hub`` with the TAPS card: create the repo, save to a temp dir, upload in one commit.

    An existing README in the repo is kept around the refreshed TAPS section, as transformers keeps it.
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    from .card import save_model_card

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ModelCard.load(repo_id, token=token).save(os.path.join(tmp, "README.md"))
        except EntryNotFoundError:
            pass
        self.save_pretrained(tmp, **save_kwargs)
        save_model_card(self, tmp, repo_id=repo_id, tags=tags)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload TAPS adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


# ----- loading -----


def load_adapter(self: nn.Module, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``load_adapter`` (also behind ``PeftModel.from_pretrained``), all or nothing: the adapter folder (a path
    or a Hub repo) is fetched as one snapshot of ``adapter_config.json`` and ``adapter_model.safetensors`` (never a
    pickle), the weights are checked against the model, and only then loaded. On any failure the model is left as it
    was; after a failed ``from_pretrained`` that means the base model without TAPS layers. A base with the adapter's
    shapes but other weights warns (``strict_base=True``: raises), see ``taps_peft.hub.identity``."""
    from peft import PeftModel

    from ..tuner.config import TAPSConfig
    from ..tuner.targets import check_saved_adapter
    from .identity import check_base

    strict_base = kwargs.pop("strict_base", False)
    existed = adapter_name in self.peft_config
    config = self.peft_config.get(adapter_name)
    # PeftModel.from_pretrained injects the adapter into the user's base, then calls this: only then is a failure
    # undone down to the plain base (a model the user built and trained is never stripped).
    fresh = existed and len(self.peft_config) == 1 and sys._getframe(1).f_code is _FROM_PRETRAINED
    try:
        check_adapter_name(adapter_name)
        local = _local_adapter(model_id, kwargs)
        config = config or TAPSConfig.from_pretrained(local)
        shapes = _check_weights_file(os.path.join(local, WEIGHTS_NAME))
        mapping = kwargs.get("key_mapping") or getattr(self.base_model.model, "_checkpoint_conversion_mapping", None)
        check_saved_adapter(self.base_model.model, config, _mapped(shapes, mapping))
        check_base(self, config, adapter_name, strict=strict_base)
        peft_kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
        return PeftModel.load_adapter(self, local, adapter_name, *args, **peft_kwargs)
    except BaseException:
        if fresh:
            _undo_injection(self)
        elif not existed and adapter_name in self.peft_config:
            self.delete_adapter(adapter_name)
        raise


def _from_pretrained_code() -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained.__func__.__code__


_FROM_PRETRAINED = _from_pretrained_code()


def _mapped(shapes: dict[str, Any], mapping: Optional[dict[str, str]]) -> dict[str, Any]:
    """The file's keys as PEFT maps them when loading with ``key_mapping`` (first matching pattern wins)."""
    if not mapping:
        return shapes
    out = {}
    for key, value in shapes.items():
        prefix = "base_model.model." if key.startswith("base_model.model.") else "base_model."
        bare = key.removeprefix(prefix)
        for pattern, replacement in mapping.items():
            bare, replaced = re.subn(pattern, replacement, bare)
            if replaced:
                break
        out[prefix + bare] = value
    return out


def _where(model_id: Any, subfolder: Optional[str]) -> str:
    return os.path.join(str(model_id), subfolder) if subfolder else str(model_id)


def _local_adapter(model_id: Any, kwargs: dict) -> str:
    """A local folder holding the adapter's config and safetensors weights: ``model_id`` itself, or one Hub snapshot
    of exactly those two files (one revision, so config and weights always belong together)."""
    where = _where(model_id, kwargs.get("subfolder"))
    if os.path.isdir(where):
        folder = where
    else:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        prefix = f"{kwargs['subfolder']}/" if kwargs.get("subfolder") else ""
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "force_download", "local_files_only")
               if kwargs.get(k) is not None}
        try:
            snapshot = huggingface_hub.snapshot_download(
                str(model_id), allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME], **hub
            )
        except HFValidationError:
            raise ValueError(
                f"Can't find '{CONFIG_NAME}' at '{where}': it is neither a local folder nor a Hub repo id."
            ) from None
        except EntryNotFoundError as err:
            raise ValueError(
                f"The Hub repo '{where}' did not serve its adapter files ({str(err).splitlines()[0]}): it lists "
                f"{WEIGHTS_NAME} but answered 404 when downloading it. taps_peft never falls back to a pickled "
                "adapter_model.bin. Check the repo (and its revision), then try again."
            ) from None
        folder = os.path.join(snapshot, kwargs["subfolder"]) if kwargs.get("subfolder") else snapshot
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return folder
    if os.path.isfile(os.path.join(folder, "adapter_model.bin")) or not os.path.isdir(where):
        raise ValueError(_PICKLE_REFUSED.format(where=where))
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} in '{where}' (it has {sorted(os.listdir(where))}): the adapter's weights are missing. "
        "Save the adapter again with save_pretrained, or copy the file back."
    )


def _check_weights_file(path: str) -> dict[str, tuple[int, ...]]:
    """Open a safetensors file (header, sizes, every value finite); return its tensors' names and shapes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            shapes = {}
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(
                        f"The TAPS adapter file '{path}' holds {bad} NaN/inf value(s) in `{key}`: the adapter is "
                        "broken (it diverged in training, or the file was damaged). Load an earlier checkpoint."
                    )
                shapes[key] = tuple(tensor.shape)
    except SafetensorError as err:
        raise ValueError(
            f"The TAPS adapter file '{path}' is not a valid safetensors file ({err}): it is truncated or corrupted. "
            "Save or download the adapter again."
        ) from None
    if not any(k.endswith(".taps_scores") for k in shapes):
        raise ValueError(
            f"'{path}' holds no TAPS layer scores ({len(shapes)} tensors, e.g. {sorted(shapes)[:3]}): these are not "
            "the weights of a TAPS adapter, though its adapter_config.json says TAPS. Save the adapter again."
        )
    return shapes


def _undo_injection(self: nn.Module) -> None:
    """Put the base model back as ``from_pretrained`` found it: the very module objects (each TAPS layer's base layer,
    each wrapper's original module), ``requires_grad`` flags, no ``peft_config``, no input-gradient hook."""
    from ..tuner.layer import TAPSLayer
    from ..tuner.model import _tuner_modules

    tuner = self.base_model
    base = tuner.model
    for name, module in _tuner_modules(base, with_names=True):
        parent, _, child = name.rpartition(".")
        original = module.get_base_layer() if isinstance(module, TAPSLayer) else module.original_module
        setattr(base.get_submodule(parent), child, original)
    for param, flag in zip(base.parameters(), tuner._base_state["requires_grad"]):
        param.requires_grad_(flag)
    if hasattr(base, "_require_grads_hook") and not tuner._base_state["input_grads_hook"]:
        base.disable_input_require_grads()  # PeftModel added it for gradient checkpointing
    base.__dict__.pop("peft_config", None)


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
