"""What trust remembers about a ``TAPSConfig`` object between PEFT's calls (where it was read from, the model saving
it), kept beside the config, never on it: a config stays PEFT's plain dataclass to copy, pickle and compare. Only
hints live here: a copy of a config without them is still checked in full when its weights load (``trust.load``), it
only misses the check of the file before injection. What belongs to a loaded adapter is kept on the tuner."""

from __future__ import annotations

import weakref
from typing import Any

_notes: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def notes(config: Any) -> dict[str, Any]:
    """The notes kept for ``config`` (empty at first; dropped when the config is collected).

    Example:
        >>> notes(config)["source"] = {"model_id": "runs/birds", "subfolder": None, "hub": {}}  # doctest: +SKIP
    """
    key = id(config)
    entry = _notes.get(key)
    if entry is None or entry[0]() is not config:
        entry = _notes[key] = (weakref.ref(config, lambda _, key=key, table=_notes: table.pop(key, None)), {})
    return entry[1]


def copy_notes(old: Any, new: Any) -> None:
    """Give ``new`` (a copy of ``old``, as the tuner's copy of a config) ``old``'s notes of where it was read from."""
    entry = _notes.get(id(old))
    if entry is not None and entry[0]() is old and "source" in entry[1]:
        notes(new)["source"] = entry[1]["source"]
