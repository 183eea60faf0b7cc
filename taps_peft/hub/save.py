"""Saving and pushing a TAPS adapter with its model card: explicit functions around PEFT's own ``save_pretrained``.

``model.save_pretrained(dir)`` is PEFT's: it writes the weights, then the config (which binds itself to those weights
through ``weights_digest``, so a folder mixing two saves is refused when loading, and then writes the TAPS model card).

- :func:`save_adapter` is what ``taps-peft train`` and ``TAPSTrainer`` use: the same files, each written to a
  temporary folder inside the target and put in place with ``os.replace`` (the config to its temporary name beside
  the weights, then the weights, then the config, then the card), so no reader ever sees a half-written file, and a save
  killed at any moment leaves a folder that loads as the old adapter or the new one. The next save removes the
  temporary file of each file it writes that a killed write left (``.<name>.taps-tmp``; no other file).
- :func:`push_to_hub` uploads that folder in one commit, keeping a README already in the repo around the TAPS section
  (``PeftModel.push_to_hub`` works too, but transformers replaces the card with its template).

Example:
    >>> from taps_peft import save_adapter, push_to_hub
    >>> save_adapter(model, "runs/birds")  # doctest: +SKIP
    >>> push_to_hub(model, "me/vit-birds-taps")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from . import temporary_name
from ..trust.saves import CONFIG_NAME, WEIGHTS_NAME
from .card import save_model_card

_ORDER = {WEIGHTS_NAME: 0, CONFIG_NAME: 1}  # within a folder: weights, then config, then anything else (the card)
_MARK = ".made-by-taps_peft"  # inside the staging folder: only such a folder is ever removed


def save_adapter(model: nn.Module, save_directory: Union[str, os.PathLike], **save_kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **save_kwargs)`` with every file replaced atomically and the TAPS model
    card; works into a mount point, under a read-only parent and through a symlinked folder. Files of yours in the
    folder are left alone (a README you wrote keeps its text around the TAPS section).

    Example:
        >>> save_adapter(model, "runs/birds", selected_adapters=["default"])  # doctest: +SKIP
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot save into '{target}': it is a file, not a folder. Choose another path.")
    unknown = set(save_kwargs.get("selected_adapters") or []) - set(model.peft_config)
    if unknown:
        raise ValueError(f"save_adapter: no adapter named {sorted(unknown)}; loaded adapters are "
                         f"{list(model.peft_config)}.")
    target.mkdir(parents=True, exist_ok=True)
    stage = temporary_name(target / "save")  # one fixed name: a save killed part-way leaves it for the next to reuse
    if stage.exists():
        if not (stage / _MARK).is_file():
            raise FileExistsError(f"'{stage}' exists and was not made by taps_peft: move it, then save again.")
        shutil.rmtree(stage)  # what a killed save of ours left
    stage.mkdir()
    (stage / _MARK).touch()
    try:
        if (target / "README.md").is_file():  # PEFT and the TAPS card update an existing card
            shutil.copy2(target / "README.md", stage / "README.md")
        model.save_pretrained(str(stage), **save_kwargs)  # with the TAPS card of each adapter (TAPSConfig's save)
        files = sorted((p for p in stage.rglob("*") if p.is_file() and p.name != _MARK),
                       key=lambda p: (len(p.relative_to(stage).parts) == 1, _ORDER.get(p.name, 2)))
        umask = os.umask(0)
        os.umask(umask)
        places = {}
        for src in files:
            src.chmod(0o666 & ~umask)  # as a plain open() would create it (safetensors writes 0o600)
            dst = target / src.relative_to(stage)
            dst = dst.resolve() if dst.is_symlink() else dst  # a file linked from elsewhere is written where it lives
            dst.parent.mkdir(parents=True, exist_ok=True)
            places[src] = dst
        # Each config goes beside its weights under its temporary name before the weights are replaced: a save killed
        # between the two replacements leaves the new config there whole, and loading takes it (TAPSConfig's
        # from_pretrained), so the folder always loads as the old adapter or the new one.
        for src in files:
            if src.name == CONFIG_NAME:
                os.replace(src, temporary_name(places[src]))
        for src in files:
            if src.name == CONFIG_NAME:
                os.replace(temporary_name(places[src]), places[src])
            else:
                os.replace(src, places[src])
            if temporary_name(places[src]).is_file():  # what an earlier killed write of this very file left
                temporary_name(places[src]).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[bool, str]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
):
    """Create the Hub repo if needed and upload the adapter (PEFT's ``save_pretrained`` files and the TAPS model card)
    in one commit; a README already in the repo keeps its text around the TAPS section. Returns the commit info.

    Example:
        >>> push_to_hub(model, "me/vit-birds-taps", private=True)  # doctest: +SKIP
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ModelCard.load(repo_id, token=token).save(os.path.join(tmp, "README.md"))
        except EntryNotFoundError:
            pass
        model.save_pretrained(tmp, **save_kwargs)
        save_model_card(model, tmp, repo_id=repo_id, tags=tags)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, token=token, revision=revision,
                                 commit_message=commit_message or "Upload TAPS adapter", create_pr=create_pr)
