"""Adapters on disk and on the Hub: the model card, saving, LoRA export; and files written whole or not at all.

:func:`atomic_write` writes each file to a temporary name beside it (:func:`temporary_name`), then ``os.replace`` puts it
in place in one step (on every OS, in a mount point, under a read-only parent, through a symlinked folder). The
temporary name is fixed per file, so a write killed part-way leaves at most one stray file, which the next write of that
file replaces. Nothing else is ever deleted.

Example:
    >>> from taps_peft.hub import atomic_write
    >>> atomic_write("runs/x/results.json", b"{}")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
__all__ = ["atomic_write", "temporary_name"]


def temporary_name(path: PathLike) -> Path:
    """Where ``path`` is written before it is put in place: ``.<name>.taps-tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.taps-tmp")


def atomic_write(path: PathLike, data: Union[bytes, str, Callable[[Path], None]]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes the file at the path it is given) to ``path``
    atomically. The file's mode follows the umask, as a plain ``open(path, "w")`` would.

    Example:
        >>> atomic_write("out/model.safetensors", lambda tmp: save_file(tensors, tmp))  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write '{path}': it is a folder. Choose another file name.")
    tmp = temporary_name(path)
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
