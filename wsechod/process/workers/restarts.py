"""When a worker that exited is started again: backoff, doubling from BACKOFF_FIRST to
BACKOFF_MAX, from the first again once a worker has lived BACKOFF_RESET; and each worker's
place (slot) with its restart schedule."""

from dataclasses import dataclass

BACKOFF_FIRST = 0.1  # seconds before a worker that exited is started again...
BACKOFF_MAX = 10.0  # ...doubling each time it exits again, up to this
BACKOFF_RESET = 10.0  # a worker that lived this long starts the next one from the first


def backoff(current: float, lived: float) -> tuple[float, float]:
    """(delay before starting again a worker that lived ``lived`` seconds, the delay after
    that): doubling from BACKOFF_FIRST to BACKOFF_MAX, from the first again once a worker
    lived BACKOFF_RESET."""
    if lived >= BACKOFF_RESET:
        current = BACKOFF_FIRST
    return current, min(2 * current, BACKOFF_MAX)


@dataclass(slots=True)
class Slot:
    """One worker's place: the process in it now, and its restart schedule."""

    index: int
    gen: int = 0  # starts so far; the scoreboard tells one start's figures from another's
    pid: int | None = None
    started: float = 0.0
    listening: bool = False  # this start has listened (and counts as running)
    recycled: tuple[int, int] | None = None  # (pid, gen) of the start being recycled (draining)
    backoff: float = BACKOFF_FIRST
    due: float | None = None  # when to start it again
