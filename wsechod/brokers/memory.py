"""The in-process broker: every member is local, so there is nothing to carry, presence is
what this process has, and history is kept here, in memory.

History: a ring per channel that was published to (``history_size`` messages, each for
``history_ttl`` seconds), every ring together at most ``history_memory`` bytes (each
message counts its payload and ``OVERHEAD``, each ring ``RING_OVERHEAD``): past it, the
channel published to least recently loses its oldest messages first, then its ring. A
ring outlives its messages (its position says a client that missed nothing so), until
memory is short. Joining or resuming creates nothing, so clients that only join any
number of channels cost history nothing. Channels get this process's epoch; once a ring
with messages has had to go, new rings get epochs of their own, so that no offset is ever
used twice in one epoch.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from wsechod.brokers.base import Deliver, Members, Snapshot
from wsechod.history import History, Position, Recovery, Stored, continued, new_epoch

OVERHEAD = 96  # bytes a message costs besides its payload (the tuple, the list's share)
RING_OVERHEAD = 512  # bytes a channel's ring costs, messages aside


class _Ring:
    __slots__ = ("entries", "epoch", "head", "top")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.top = 0
        # Entries from ``head`` on are kept (a list: a resume reads any part of it at once).
        self.entries: list[tuple[Stored, float, int]] = []  # with when, and its size
        self.head = 0

    def __len__(self) -> int:
        return len(self.entries) - self.head

    def pop(self) -> int:
        """Forget the oldest entry: its size."""
        size = self.entries[self.head][2]
        self.head += 1
        if self.head > 64 and self.head * 2 > len(self.entries):
            del self.entries[: self.head]
            self.head = 0
        return size


class MemoryHistory:
    """Every channel's ring, bounded in total by ``limit`` bytes."""

    def __init__(self, limit: int, now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.held = 0  # bytes in every ring
        self.epoch = new_epoch()  # for new rings, until one with messages had to go
        self._now = now
        self._rings: OrderedDict[str, _Ring] = OrderedDict()  # least recently used first

    def append(self, channel: str, payload: bytes, text: bool, history: History) -> Position:
        now = self._now()
        ring = self._rings.get(channel)
        if ring is None:
            ring = self._rings[channel] = _Ring(self.epoch)
            self.held += RING_OVERHEAD
        else:
            self._rings.move_to_end(channel)
        ring.top += 1
        size = len(payload) + OVERHEAD
        ring.entries.append((Stored(ring.top, payload, text), now, size))
        self.held += size
        self._trim(ring, history, now)
        while self.held > self.limit:  # the least recently used channel's, oldest first
            name, oldest = next(iter(self._rings.items()))
            if len(oldest):
                self.held -= oldest.pop()
            elif oldest is not ring:
                del self._rings[name]
                self.held -= RING_OVERHEAD
                if oldest.top:  # its offsets must not come back in this epoch
                    self.epoch = new_epoch()
            else:
                break
        return Position(ring.top, ring.epoch)

    def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        ring = self._rings.get(channel)
        if ring is None:  # nothing published (or all forgotten): nothing to read
            return continued(since, Position(0, self.epoch), [])
        self._trim(ring, history, self._now())
        after: list[Stored] = []
        if since is not None and since.epoch == ring.epoch and len(ring):
            first = ring.entries[ring.head][0].offset
            start = ring.head + max(0, since.offset + 1 - first)
            after = [e[0] for e in ring.entries[start : start + limit]]
        return continued(since, Position(ring.top, ring.epoch), after)

    def _trim(self, ring: _Ring, history: History, now: float) -> None:
        """What is over the channel's size, or older than its ttl, goes."""
        while len(ring) and (
            len(ring) > history.size or ring.entries[ring.head][1] + history.ttl < now
        ):
            self.held -= ring.pop()


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
