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
    (hard-linked into the new folder; symbolic links and empty folders are recreated), and so are the folder's own
    mode and group. The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so no kill at any point leaves ``target``
    missing or mixed; elsewhere it is two renames, with ``target`` absent for an instant. New files' modes follow the
    umask. Temporary folders of earlier saves killed part-way (their process is gone) are removed.

    Where the folder cannot be swapped (it holds the working directory: the process would be left in a deleted
    folder; or its parent is not writable, as for a mounted output folder), its files are replaced one by one, each
    atomically, from a temporary folder inside it.

    Example:
        >>> replace_folder("runs/x", lambda tmp: (tmp / "a.txt").write_text("done"))  # doctest: +SKIP
    """
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Cannot save into '{target}': it is a file, not a folder. Choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    in_place = target == Path.cwd() or target in Path.cwd().parents or not os.access(target.parent, os.W_OK)
    if in_place:
        target.mkdir(exist_ok=True)
    home = target if in_place else target.parent
    _remove_stale(home, target.name)
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".{target.name}{_TMP}{os.getpid()}-"))
    try:
        write(tmp)
        _apply_umask(tmp)
        if in_place:
            for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
                (target / src.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, target / src.relative_to(tmp))
        elif not target.exists():
            os.rename(tmp, target)
        else:
            _keep(target, tmp)
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


def _keep(old: Path, new: Path) -> None:
    """Give ``new`` what ``old`` holds and ``new`` lacks (files hard-linked or copied, symbolic links and empty folders
    recreated), and ``old``'s mode and group."""
    for root, dirs, files in os.walk(old):
        here = Path(root)
        for name in dirs + files:
            src, dst = here / name, new / (here / name).relative_to(old)
            if dst.exists() or dst.is_symlink():
                continue
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                dst.mkdir(parents=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    stat = old.stat()
    new.chmod(stat.st_mode & 0o7777)
    try:
        os.chown(new, -1, stat.st_gid)
    except OSError:
        pass


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale(home: Path, name: str) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` folders left in ``home`` by saves whose process no longer runs."""
    for path in home.glob(f".{name}{_TMP}*"):
        pid = path.name[len(name) + 1 + len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
