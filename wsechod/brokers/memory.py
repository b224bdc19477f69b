"""The in-process broker: every member is local, so there is nothing to carry, presence is
what this process has, and history is kept here, in memory.

History: a ring per channel (``history_size`` messages, each for ``history_ttl`` seconds),
and all of them together at most ``history_memory`` bytes: past it, the oldest messages of
the channel published to least recently go first (a resume that needed them is told they
are lost). A channel's epoch
is made when its history is, so a restart of the process is a new epoch everywhere. What a
channel's ring no longer holds, its position (epoch and top offset) still says, for up to
``RINGS`` channels, so that a client resuming after a quiet spell is told it missed
nothing rather than that history was lost.
"""

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from wsechod.brokers.base import Deliver, Members, Snapshot
from wsechod.history import History, Position, Recovery, Stored, continued, new_epoch

RINGS = 65_536  # channels whose position is remembered; beyond, the least recently used go
OVERHEAD = 96  # bytes an entry costs besides its payload (the tuple, the deque's share)


class _Ring:
    __slots__ = ("entries", "epoch", "top")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.top = 0
        self.entries: deque[tuple[Stored, float, int]] = deque()  # with when, and its size


class MemoryHistory:
    """Every channel's ring, bounded in total by ``limit`` bytes."""

    def __init__(self, limit: int, now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.held = 0  # bytes in every ring
        self._now = now
        self._rings: OrderedDict[str, _Ring] = OrderedDict()  # least recently used first

    def append(self, channel: str, payload: bytes, text: bool, history: History) -> Position:
        ring, now = self._ring(channel), self._now()
        ring.top += 1
        size = len(payload) + OVERHEAD
        ring.entries.append((Stored(ring.top, payload, text), now, size))
        self.held += size
        self._trim(ring, history, now)
        rings = iter(self._rings.values())
        while self.held > self.limit:  # the least recently used channel's, oldest first
            oldest = next(rings)
            while oldest.entries and self.held > self.limit:
                self.held -= oldest.entries.popleft()[2]
        return Position(ring.top, ring.epoch)

    def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        ring = self._ring(channel)
        self._trim(ring, history, self._now())
        top = Position(ring.top, ring.epoch)
        after: list[Stored] = []
        if since is not None and since.epoch == ring.epoch and ring.entries:
            start = max(0, since.offset + 1 - ring.entries[0][0].offset)
            after = [e[0] for e in itertools.islice(ring.entries, start, start + limit)]
        return continued(since, top, after)

    def _ring(self, channel: str) -> _Ring:
        ring = self._rings.get(channel)
        if ring is None:
            ring = self._rings[channel] = _Ring()
            if len(self._rings) > RINGS:
                _, gone = self._rings.popitem(last=False)
                self.held -= sum(size for _, _, size in gone.entries)
        else:
            self._rings.move_to_end(channel)
        return ring

    def _trim(self, ring: _Ring, history: History, now: float) -> None:
        """What is over the channel's size, or older than its ttl, goes."""
        entries = ring.entries
        while entries and (len(entries) > history.size or entries[0][1] + history.ttl < now):
            self.held -= entries.popleft()[2]


class MemoryBroker:
    def __init__(self, *, history_memory: int = 64 * 2**20) -> None:
        self._snapshot: Snapshot = dict
        self._deliver: Deliver | None = None
        self.history = MemoryHistory(history_memory)

    async def start(self, deliver: Deliver, snapshot: Snapshot) -> None:
        self._deliver = deliver
        self._snapshot = snapshot

    def subscribe(self, channel: str) -> None:
        pass

    def unsubscribe(self, channel: str) -> None:
        pass

    def publish(
        self,
        channel: str,
        payload: bytes,
        text: bool,
        *,
        history: History | None = None,
        origin: int = 0,
    ) -> "asyncio.Future[Position | None] | None":
        if history is None:
            return None  # every member is here: the relay has delivered it
        at = self.history.append(channel, payload, text, history)
        assert self._deliver is not None
        self._deliver(channel, payload, text, at, origin)
        done: asyncio.Future[Position | None] = asyncio.get_running_loop().create_future()
        done.set_result(at)
        return done

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        return self.history.recover(channel, since, limit, history)

    def writable(self) -> bool:
        return True

    def when_writable(self, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(callback)

    def degraded(self) -> str | None:
        return None

    def stats(self) -> dict[str, int]:
        return {"history_bytes": self.history.held}

    def presence_changed(self) -> None:
        pass

    async def channel_counts(self) -> dict[str, int]:
        return {name: count for name, (count, _) in self._snapshot().items()}

    async def channel_members(self, channel: str) -> Members:
        return self._snapshot().get(channel, (0, {}))

    async def close(self) -> None:
        pass
