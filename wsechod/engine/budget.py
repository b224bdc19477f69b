"""The memory budget: what the whole process buffers for its clients, bounded.

Each connection is bounded on its own (a frame being assembled, at most ``max_size``; a
write buffer, which stops reading from whoever fills it past ``write_limit``), but many
connections at their bounds add up: a thousand clients each holding a 1 MiB frame open
make a gigabyte. The budget counts, for the whole process,

- what connections hold of frames still arriving (exactly: the engine's slow path, where
  a frame spans reads, is where it grows) and of messages an application puts together
  for them (``Connection.hold``, the relay's reassembly of fragments);
- the write buffers of the connections above ``write_limit`` ("blocked": they are the
  ones that grow; the others hold less than ``write_limit`` each), summed every
  ``CHECK_INTERVAL``.

Over ``limit``, reading stops on every connection that holds part of a frame, and on any
other as soon as it starts one (whole small messages, the common case, are read as
usual: they do not stay in memory). Back under ``RESUME_AT`` of the limit, reading goes
on. Over the limit, or above ``RESUME_AT`` with connections still paused (they hold frames
they cannot finish: the total would never go down), for ``GRACE`` seconds: the
connections that hold the most are closed with 1013 (try again later) until the rest is
under ``RESUME_AT``; a partial frame is dropped at once, a client that does not read its
buffer is cut. A connection paused here is not failed by its keepalive meanwhile: its
pongs wait behind what is not read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Protocol

from wsechod import ratelimit
from wsechod.engine.frames import CloseCode

CHECK_INTERVAL = 0.1  # seconds between sums of the blocked write buffers
GRACE = 1.0  # seconds over the limit before the heaviest connections are closed
RESUME_AT = 0.75  # share of the limit under which reading goes on

warn = ratelimit.logger("wsechod.engine")


class Holder(Protocol):
    """A connection, as the budget sees it."""

    peer: str

    @property
    def blocked(self) -> bool:
        """Its write buffer is above ``write_limit``."""

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written to it."""

    @property
    def holding(self) -> bool:
        """Part of a frame is buffered, or the application holds part of a message."""

    @property
    def weight(self) -> int:
        """What closing it would let go of."""

    def memory_pause(self) -> None: ...

    def memory_resume(self) -> None: ...

    def close_for_memory(self, code: CloseCode) -> None: ...


class Budget:
    """One process's budget; ``held`` is kept by the connections themselves."""

    __slots__ = (
        "_connections",
        "_loop",
        "_over_since",
        "_timer",
        "blocked",
        "bodies",
        "closed",
        "held",
        "limit",
        "outgoing",
        "paused",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, connections: Collection[Holder], limit: int
    ) -> None:
        self._loop = loop
        self._connections = connections  # the engine's table, as it changes
        self.limit = limit
        self.held = 0  # bytes of frames still arriving, and held by applications
        self.bodies = 0  # of which HTTP request bodies being read (no connection to pause)
        self.outgoing = 0  # the blocked connections' write buffers, at the last check
        self.blocked: set[Holder] = set()  # above write_limit
        self.paused: set[Holder] = set()  # not read while over the limit
        self.closed = 0  # connections closed to bring the process back under
        self._over_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def total(self) -> int:
        return self.held + self.outgoing

    def room_for_body(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more of request bodies fit: at most a quarter of the limit for
        them all, and never past the limit (a body cannot be paused like a connection, and
        must not get WebSockets closed for it)."""
        if not self.limit:
            return True
        return self.bodies + nbytes <= self.limit // 4 and self.total + nbytes <= self.limit

    def start(self) -> None:
        self._timer = self._loop.call_later(CHECK_INTERVAL, self.check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def check(self) -> None:
        """Every CHECK_INTERVAL: sum the blocked write buffers, then pause, resume or
        shed as the total says."""
        self._timer = self._loop.call_later(CHECK_INTERVAL, self.check)
        self.outgoing = sum(ws.buffered for ws in self.blocked)
        total = self.total
        if total <= self.limit * RESUME_AT:
            self._over_since = None
            if self.paused:
                paused, self.paused = self.paused, set()
                for ws in paused:
                    ws.memory_resume()
            return
        if total <= self.limit and not self.paused:
            self._over_since = None  # between the two marks, nobody waiting: as it is
            return
        now = self._loop.time()
        if self._over_since is None:
            self._over_since = now
            warn.warning(
                "memory limit reached: reading paused",
                reason="memory_limit",
                buffered=total,
                limit=self.limit,
            )
            for ws in self._connections:
                if ws.holding:
                    self.pause(ws)
        elif now - self._over_since >= GRACE:
            self._shed(total - int(self.limit * RESUME_AT))
            self._over_since = now  # what was closed takes a moment to be gone

    def pause(self, ws: Holder) -> None:
        if ws not in self.paused:
            self.paused.add(ws)
            ws.memory_pause()

    def forget(self, ws: Holder) -> None:
        self.blocked.discard(ws)
        self.paused.discard(ws)

    def _shed(self, excess: int) -> None:
        """Close the heaviest connections until ``excess`` bytes are let go."""
        heavy = sorted(
            (ws for ws in self._connections if ws.holding or ws.blocked),
            key=lambda ws: ws.weight,
            reverse=True,
        )
        for ws in heavy:
            if excess <= 0:
                break
            excess -= ws.weight
            self.closed += 1
            warn.warning(
                "connection closed: memory limit",
                reason="memory_limit",
                peer=ws.peer,
                held=ws.weight,
                limit=self.limit,
            )
            ws.close_for_memory(CloseCode.TRY_AGAIN_LATER)
