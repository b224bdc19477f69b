"""Rate-limited warnings: a client (or a broken dependency) can trigger an event thousands
of times a second, and a log line for each would turn one bad client into a disk-filling
flood. Each reason logs at once the first time, then at most one line per interval that
says how many times it happened meanwhile (``count``), so nothing is hidden and the volume
is bounded by the number of reasons, not by the number of events.
"""

import asyncio
import time
from typing import Any

import structlog

INTERVAL = 1.0  # seconds: at most one line per reason per interval


class RateLimitedLog:
    """``warning(event, **fields)``: the first occurrence is logged at once; repeats within
    ``interval`` are counted and logged as one line when the interval ends."""

    def __init__(self, logger: Any, interval: float = INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._until: dict[str, float] = {}  # event -> end of its quiet window
        self._repeats: dict[str, tuple[int, dict[str, Any]]] = {}  # held back meanwhile

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now >= self._until.get(event, 0.0):
            self._until[event] = now + self._interval
            self._log.warning(event, count=1, **fields)
            return
        count, _ = self._repeats.get(event, (0, fields))
        if count == 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: the next event outside the window reports
                loop = None
            if loop is not None:
                loop.call_at(loop.time() + self._until[event] - now, self._flush, event)
        self._repeats[event] = (count + 1, fields)  # the latest fields stand for the batch

    def _flush(self, event: str) -> None:
        count, fields = self._repeats.pop(event, (0, {}))
        if count:
            self._until[event] = time.monotonic() + self._interval
            self._log.warning(event, count=count, **fields)

    def flush(self) -> None:
        """Log every count still held back (at shutdown)."""
        for event in list(self._repeats):
            self._flush(event)


def logger(name: str) -> RateLimitedLog:
    return RateLimitedLog(structlog.stdlib.get_logger(name))
