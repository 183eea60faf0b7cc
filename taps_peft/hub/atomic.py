"""Atomic writes: nothing half-written is ever left where a reader looks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` in a temporary folder beside ``target``, then move each file it wrote into ``target`` with
    ``os.replace``: every file lands whole, and a failure part-way leaves the previous files as they were.

    Example:
        >>> write_atomically("runs/x", lambda tmp: (tmp / "a.txt").write_text("done"))  # doctest: +SKIP
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
        write(Path(tmp))
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
