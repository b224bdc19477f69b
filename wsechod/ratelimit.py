"""Rate-limited warnings: a client (or a broken dependency) can trigger an event thousands
of times a second, and a log line for each would turn one bad client into a disk-filling
flood. Each reason logs at once the first time, then at most one line per interval that
says how many times it happened meanwhile (``count``), so nothing is hidden and the volume
is bounded by the number of reasons, not by the number of events.
"""

import asyncio
import time
import weakref
from typing import Any

from wsechod.log import get_logger

INTERVAL = 1.0  # seconds: at most one line per reason per interval
MAX_KEYS = 1024  # reasons remembered before those whose window is over are forgotten


class RateLimitedLog:
    """``warning(event, **fields)`` (or ``info``, ``error``): the first occurrence is
    logged at once; repeats within ``interval`` are counted and logged as one line when
    the interval ends."""

    def __init__(self, logger: Any, interval: float = INTERVAL, *, polled: bool = False) -> None:
        """``polled``: for a process with no event loop to time the counts held back
        (the supervisor's main process): its owner asks when one is ``due`` and calls
        ``flush_due`` then, and ``flush`` at exit; ``flush_all`` leaves it alone (a
        worker forked with it must not log what the main process held back)."""
        self._log = logger
        self._interval = interval
        self._polled = polled
        self._until: dict[str, float] = {}  # event and reason -> end of its quiet window
        self._repeats: dict[str, tuple[int, str, str, dict[str, Any]]] = {}  # held back
        if not polled:
            _ALL.add(self)

    def info(self, event: str, **fields: Any) -> None:
        self._event("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._event("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """With the traceback of the exception being handled, the first time only."""
        self._event("error", event, fields)

    def _event(self, level: str, event: str, fields: dict[str, Any]) -> None:
        """One line per event and ``reason`` field per interval. An error carries the
        traceback of the exception being handled (or ``exc_info``), the first time only."""
        exc_info = fields.pop("exc_info", True)
        key = f"{event}\0{fields.get('reason', '')}"
        now = time.monotonic()
        if now >= self._until.get(key, 0.0):
            if len(self._until) >= MAX_KEYS:
                self._forget(now)
            self._until[key] = now + self._interval
            held = self._repeats.pop(key, (0, level, event, fields))[0]  # no timer reported
            extra = {"exc_info": exc_info} if level == "error" else {}
            getattr(self._log, level)(event, count=1 + held, **fields, **extra)
            return
        count = self._repeats.get(key, (0, level, event, fields))[0]
        if count == 0 and not self._polled:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # no loop: the next event outside the window reports
                loop = None
            if loop is not None:
                loop.call_later(self._until[key] - now, self._flush, key)
        self._repeats[key] = (count + 1, level, event, fields)  # the latest stand for all

    def _forget(self, now: float) -> None:
        """Windows that are over and hold nothing back: however many reasons come and
        go, the table stays bounded."""
        for key, until in list(self._until.items()):
            if until <= now and key not in self._repeats:
                del self._until[key]

    def _flush(self, key: str) -> None:
        count, level, event, fields = self._repeats.pop(key, (0, "warning", "", {}))
        if count:
            self._until[key] = time.monotonic() + self._interval
            getattr(self._log, level)(event, count=count, **fields)

    def flush(self) -> None:
        """Log every count still held back (at shutdown)."""
        for key in list(self._repeats):
            self._flush(key)

    def due(self) -> float | None:
        """When the first count held back is to be logged (``time.monotonic()``)."""
        return min((self._until[key] for key in self._repeats), default=None)

    def flush_due(self) -> None:
        """Log the counts held back whose interval has ended."""
        now = time.monotonic()
        for key in list(self._repeats):
            if now >= self._until[key]:
                self._flush(key)


_ALL: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def logger(name: str) -> RateLimitedLog:
    return RateLimitedLog(get_logger(name))


def flush_all() -> None:
    """At shutdown: every count still held back is logged, so none goes unreported."""
    for limited in list(_ALL):
        limited.flush()
