"""Folder-atomic writes: a reader (or a crash) sees the whole old folder or the whole new one, never a mix."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

_RENAME_EXCHANGE = 2  # linux/fs.h
_TMP = ".tmp-"


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a fresh folder beside ``target``, then put that folder in ``target``'s place in one step.

    Files already in ``target`` that ``write`` does not produce (a user's notes, a trainer's optimizer state) are kept
    (hard-linked into the new folder). The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so no kill at any point
    leaves ``target`` missing or mixed; elsewhere it is two renames, with ``target`` absent for an instant. File modes
    follow the umask, like any file a user writes. Temporary folders of earlier saves killed part-way (their process
    is gone) are removed. A ``target`` that holds the working directory is not swapped (the process would be left in a
    deleted folder): its files are replaced one by one, each atomically.

    Example:
        >>> replace_folder("runs/x", lambda tmp: (tmp / "a.txt").write_text("done"))  # doctest: +SKIP
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_TMP}{os.getpid()}-"))
    try:
        write(tmp)
        _apply_umask(tmp)
        if target == Path.cwd() or target in Path.cwd().parents:
            for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
                (target / src.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, target / src.relative_to(tmp))
        elif not target.exists():
            os.rename(tmp, target)
        else:
            _link_missing(target, tmp)
            if not _exchange(tmp, target):
                old = tmp.with_name(tmp.name + "-old")
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder after a failure, the old one after the swap
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the call is not available."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _link_missing(old: Path, new: Path) -> None:
    """Hard-link (or copy) every file of ``old`` that ``new`` lacks into ``new``."""
    for src in old.rglob("*"):
        dst = new / src.relative_to(old)
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale(target: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` folders left by saves whose process no longer runs."""
    for path in target.parent.glob(f".{target.name}{_TMP}*"):
        pid = path.name[len(target.name) + 1 + len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
