"""File descriptors only the main process may keep.

Forked workers inherit every descriptor. Two must not outlive the main process in them:
the pidfile's (its flock lock would say "already running" after the main process died,
until the last worker had drained) and the daemon launcher's pipe (the launcher waits
for its end). Whoever opens one registers it; a worker closes them all first thing.
"""

import contextlib
import os

_private: set[int] = set()


def private(fd: int) -> None:
    _private.add(fd)


def released(fd: int) -> None:
    """Closed by its owner: nothing for a worker to close (the number may be reused)."""
    _private.discard(fd)


def close_private() -> None:
    for fd in sorted(_private):
        with contextlib.suppress(OSError):
            os.close(fd)
    _private.clear()
