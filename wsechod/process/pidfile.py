"""The pidfile: written atomically, locked with flock(2) for the life of the process.

A kernel lock, not the file's existence, says whether a daemon is running: the kernel drops
it when the process dies, however it dies, so a pidfile left by ``kill -9`` or a crash is
recognised as stale and taken over. The pid is written to a temporary file that is locked
before it is renamed into place, so readers never see a partial file and there is no moment
when the path is unlocked.

python-daemon's ``DaemonContext`` takes any context manager as its ``pidfile``; this is one.
"""

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path
from types import TracebackType

from wsechod.process import fds, paths

# Times to retry when the pidfile is replaced between opening and locking it; each retry
# means another process took it over meanwhile, so a few are plenty.
LOCK_ATTEMPTS = 10


class PidFileError(Exception):
    """The pidfile cannot be taken; the message is one line for the operator."""


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    """The pid of the live process holding the pidfile. A starter that just won the lock
    may not have renamed its pid into place yet, so read again for a moment rather than
    name an old pid or none."""
    deadline = time.monotonic() + 2.0
    text = ""
    while True:
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
        if text.isdigit() and _alive(int(text)):
            return text
        if time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fds: list[int] = []
        self._inode: tuple[int, int] | None = None
        self.stale_pid: str | None = None  # what a stale pidfile said, once acquired

    def check(self, owner: tuple[int, int] | None = None) -> None:
        """Fail early, before detaching, if a live process holds the pidfile or its
        directory cannot take it. Taking it for real happens in ``acquire``.

        A missing directory is created (``/run/wsechod`` vanishes at reboot), owned by
        ``owner`` (uid, gid) when the daemon will drop root, so it can write there.
        """
        directory = self.path.parent
        try:
            paths.make_directory(directory, owner)
        except OSError as exc:
            raise PidFileError(f"cannot create {directory}: {exc.strerror}") from None
        try:
            # Non-blocking and no symlinks: a FIFO or a planted link must not hang or redirect us.
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PidFileError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        else:
            try:
                if not _try_lock(fd):
                    raise PidFileError(f"already running (pid {_holder(self.path)})")
            finally:
                os.close(fd)
        try:
            with tempfile.TemporaryFile(dir=self.path.parent):
                pass
        except OSError as exc:
            where = self.path.parent
            raise PidFileError(f"cannot write pidfile in {where}: {exc.strerror}") from None

    def acquire(self) -> None:
        for _ in range(LOCK_ATTEMPTS):
            current = self._lock_current()
            if current is not None:
                break
        else:
            raise PidFileError(f"cannot lock pidfile {self.path}: it keeps being replaced")
        self._fds.append(current)
        fds.private(current)
        # Whatever the file says, no live process holds its lock: it is stale.
        self.stale_pid = os.read(current, 64).decode(errors="replace").strip() or None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        except OSError as exc:
            self.release()
            raise PidFileError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        self._fds.append(fd)
        fds.private(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # new file: nobody else can hold it
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fchmod(fd, 0o644)
            os.fsync(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            os.unlink(tmp)
            self.release()
            raise PidFileError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)

    def _lock_current(self) -> int | None:
        """Lock the file at the path; None if, by the time the lock was ours, the path
        named another file. A starter paused between open and lock can otherwise lock the
        file of a holder that has since exited and unlinked it, while a third starter has
        put its own in place: two "holders", each sure it is alone."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidFileError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        if not _try_lock(fd):
            os.close(fd)
            raise PidFileError(f"already running (pid {_holder(self.path)})")
        locked = os.fstat(fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (locked.st_dev, locked.st_ino):
            os.close(fd)  # drops the lock on the orphan; try the file that is there now
            return None
        return fd

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then drop the locks."""
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            self._inode = None
        for fd in self._fds:
            os.close(fd)
            fds.released(fd)
        self._fds.clear()

    def __enter__(self) -> "PidFile":
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
