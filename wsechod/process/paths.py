"""Directories a daemon needs before it drops root: made, and handed to the user it will
run as, at start (``/run/wsechod`` vanishes at reboot, ``/var/log/wsechod`` may never have
existed); only checked, never made, by ``--check-config``."""

import errno
import os
from pathlib import Path


def make_directory(directory: Path, owner: tuple[int, int] | None) -> None:
    """Create ``directory`` and its parents if missing; the last one is owned by ``owner``
    (uid, gid) when the daemon will drop root, so it can write there. Raises OSError."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, mode=0o755)
    if owner is not None:
        os.chown(directory, *owner)


def cannot_create(directory: Path) -> str | None:
    """Why ``make_directory`` would fail in this process, or None: the nearest existing
    ancestor must be a directory it can write to."""
    path = directory
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return os.strerror(errno.ENOTDIR)
    return None if path == directory else unwritable(path)


def cannot_write_file(path: Path) -> str | None:
    """Why opening ``path`` for writing (creating it if missing) would fail in this
    process, or None. A missing directory is not an error here: it gets made."""
    if path.is_dir():
        return os.strerror(errno.EISDIR)
    if path.exists():
        return unwritable(path, os.W_OK)
    return unwritable(path.parent) if path.parent.is_dir() else None


def unwritable(path: Path, mode: int = os.W_OK | os.X_OK) -> str | None:
    """None if this process may write to ``path`` (a directory: create files in it), else
    the reason, worded as the failing call would word it."""
    if os.access(path, mode):
        return None
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    return os.strerror(errno.EACCES)
