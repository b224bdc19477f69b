"""What comes back from Redis on its way to the relay: each envelope checked (what is not
wsechod's is dropped and counted as malformed), an instance's own messages recognised, and
for channels with history, offset order kept. A gap in a channel (messages a broken
session never saw) is repaired from the channel's stream, after checking that Redis has
not lost what this instance delivered (``CHECK``: a new epoch if it has); live messages
that arrive meanwhile are held (at most ``REPAIR_BACKLOG`` bytes a channel, beyond which
they are read from the stream again), then delivered, each once."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from wsechod.brokers.base import Deliver
from wsechod.brokers.format import (
    BINARY,
    CHECK_SHA,
    CONTROL,
    HEAD,
    ID_SIZE,
    MAGIC,
    META_TTL,
    ORIGIN_SIZE,
    TEXT,
    channel_of,
    history_keys,
)
from wsechod.history import History, Position, Recovery, new_epoch
from wsechod.ratelimit import RateLimitedLog

REPAIR_BACKLOG = 4 * 2**20  # bytes of live messages held per channel while it is repaired
OVERHEAD = 64  # bytes counted per held message besides its payload (the Python objects)
CHUNK = 256  # entries read at a time while a channel is repaired
ANY_HISTORY = History(1, 1.0)  # Redis trims its streams itself: recover() needs no policy

# A message with history held while its channel is repaired: payload, text, where, origin.
Held = tuple[bytes, bool, Position, int]
Read = Callable[[str, tuple[Any, ...]], Awaitable[Any]]
Recover = Callable[[str, Position | None, int, History], Awaitable[Recovery]]


class Inbound:
    """One broker's receiving side; ``read`` and ``recover`` go to Redis through the
    session (ConnectionError when there is none)."""

    def __init__(
        self,
        instance: bytes,
        counts: dict[str, int],
        warn: RateLimitedLog,
        *,
        subscribed: Callable[[str], bool],
        read: Read,
        recover: Recover,
    ) -> None:
        self.instance = instance
        self.counts = counts
        self.deliver: Deliver | None = None
        self._warn = warn
        self._subscribed = subscribed
        self._read = read
        self._recover = recover
        self._last: dict[str, Position] = {}  # per channel with history: delivered up to
        self._repairs: dict[str, list[Held]] = {}
        self._repair_bytes: dict[str, int] = {}
        self._repairing: set[asyncio.Task[None]] = set()

    def left(self, channel: str) -> None:
        """No member here any more: where the channel was is forgotten."""
        self._last.pop(channel, None)

    def session_started(self) -> None:
        """Every channel delivered before is held until it is repaired."""
        for channel in self._last:
            self._repairs.setdefault(channel, [])

    def session_up(self) -> None:
        """Subscribed again: read what was missed."""
        for name in list(self._repairs):
            self._start_repair(name)

    def session_ended(self) -> None:
        """Repairs stop: the next session repairs again."""
        for task in self._repairing:
            task.cancel()
        self._repairs.clear()
        self._repair_bytes.clear()

    def received(self, channel: object, payload: object) -> None:
        if not isinstance(payload, bytes) or not isinstance(channel, bytes):
            return
        if channel == CONTROL.encode():
            return  # ours to stay in pub/sub mode, not a channel's
        own = payload[len(MAGIC) : len(MAGIC) + ID_SIZE] == self.instance
        kind = payload[len(MAGIC) + ID_SIZE : len(MAGIC) + ID_SIZE + 1]
        line, newline, body = payload[HEAD:].partition(b"\n")
        try:
            if not payload.startswith(MAGIC) or not newline:
                raise ValueError("not a wsechod envelope")
            if kind not in (TEXT, BINARY):
                raise ValueError(f"unknown frame type {kind!r}")
            offset, _, epoch = line.decode("ascii").partition(" ")
            at = Position(int(offset), epoch) if offset != "0" else None
            if kind == TEXT:
                body.decode()  # a text frame must be UTF-8: check it once, here
            name = channel_of(channel)
        except ValueError as exc:  # UnicodeDecodeError too: someone else's message
            self.counts["malformed"] += 1
            self._warn.warning("malformed message from redis dropped", error=str(exc))
            return
        if at is None:
            if not own:  # our own came back: already delivered here
                self._hand(name, body, kind == TEXT, None, 0)
            return
        origin = int.from_bytes(payload[HEAD - ORIGIN_SIZE : HEAD], "big") if own else 0
        self._numbered(name, body, kind == TEXT, at, origin)

    def _numbered(self, name: str, body: bytes, text: bool, at: Position, origin: int) -> None:
        """A message with history, in offset order: once (not again after a repair), and
        a gap in its channel is repaired from history first."""
        held = self._repairs.get(name)
        if held is not None:  # being repaired: it waits for that
            self._hold(name, held, (body, text, at, origin))
            return
        last = self._last.get(name)
        if last is not None and last.epoch == at.epoch:
            if at.offset <= last.offset:
                return  # had it already (from history, during a repair)
            if at.offset > last.offset + 1:  # a gap: messages this session never saw
                held = self._repairs[name] = []
                self._hold(name, held, (body, text, at, origin))
                self._start_repair(name)
                return
        if self._subscribed(name):
            self._last[name] = at
        self._hand(name, body, text, at, origin)

    def _hold(self, name: str, held: list[Held], message: Held) -> None:
        size = self._repair_bytes.get(name, 0) + len(message[0]) + OVERHEAD
        if size > REPAIR_BACKLOG:  # too much: what is held is read from history again
            held.clear()
            size = 0
        else:
            held.append(message)
        self._repair_bytes[name] = size

    def _hand(self, name: str, body: bytes, text: bool, at: Position | None, origin: int) -> None:
        assert self.deliver is not None
        try:
            if self.deliver(name, body, text, at, origin) and not origin:
                self.counts["delivered"] += 1
        except Exception as exc:  # a relay bug must not end cross-instance relay
            self._warn.warning("broker delivery failed", error=repr(exc))

    def _start_repair(self, name: str) -> None:
        task = asyncio.create_task(self._repair(name))
        self._repairing.add(task)
        task.add_done_callback(self._repairing.discard)

    async def _repair(self, name: str) -> None:
        """Deliver what history holds after the last message delivered in ``name``, then
        what was held meanwhile; what history no longer holds is lost, and said so."""
        checked = False
        while (held := self._repairs.get(name)) is not None:
            last = self._last.get(name)
            if last is None or not self._subscribed(name):
                break
            try:
                if not checked:  # has Redis lost what this instance delivered?
                    check = (*history_keys(name), last.epoch, last.offset, new_epoch(), META_TTL)
                    await self._read(name, ("EVALSHA", CHECK_SHA, 2, *check))
                    checked = True
                found = await self._recover(name, last, CHUNK, ANY_HISTORY)
            except ConnectionError:
                return  # the session is over; the next one repairs again
            if found.entries is None:
                self.counts["lost"] += (
                    found.top.offset - last.offset if (found.top.epoch == last.epoch) else 0
                )
                self._warn.warning(
                    "history could not fill a gap", channel=name, since=last.offset,
                    top=found.top.offset, epoch_changed=found.top.epoch != last.epoch,
                )  # fmt: skip
                self._last[name] = found.top
            else:
                for entry in found.entries:
                    at = Position(entry.offset, found.top.epoch)
                    self._last[name] = at
                    self._hand(name, entry.payload, entry.text, at, 0)
                if len(found.entries) == CHUNK:
                    continue
            del self._repairs[name]
            self._repair_bytes.pop(name, None)
            for body, text, at, origin in held:  # may find a gap again, and hold anew
                self._numbered(name, body, text, at, origin)
            return
