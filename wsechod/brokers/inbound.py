"""What comes back from Redis on its way to the relay: each envelope checked (what is not
wsechod's is dropped and counted as malformed), an instance's own messages recognised, and
for channels with history, offset order kept. A gap in a channel (messages a broken
session never saw) is repaired from the channel's stream, after checking that Redis still
holds what this instance delivered (``LOOK``, against the channel's ``Trail``): if it lost
some, or numbered other messages with their offsets, the channel is renumbered in a new
epoch (``DIVERGE``, or followed where another instance did it) and this instance delivers
what differs. Live messages that arrive meanwhile are held (at most ``REPAIR_BACKLOG``
bytes a channel, beyond which they are read from the stream again), then delivered, each
once."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from wsechod.brokers.base import Deliver
from wsechod.brokers.format import (
    BINARY,
    CONTROL,
    DIVERGE_SHA,
    HEAD,
    ID_SIZE,
    LOOK_SHA,
    MAGIC,
    META_TTL,
    ORIGIN_SIZE,
    TEXT,
    channel_of,
    history_keys,
)
from wsechod.brokers.trail import WINDOW, Look, Trail, first_difference, looked
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
        self._trails: dict[str, Trail] = {}  # per channel with history: what was delivered
        self._repairs: dict[str, list[Held]] = {}
        self._repair_bytes: dict[str, int] = {}
        self._repairing: set[asyncio.Task[None]] = set()

    def left(self, channel: str) -> None:
        """No member here any more: where the channel was is forgotten."""
        self._trails.pop(channel, None)

    def session_started(self) -> None:
        """Every channel delivered before is held until it is repaired."""
        for channel in self._trails:
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
        trail = self._trails.get(name)
        if trail is not None:
            last = trail.at
            if last.epoch == at.epoch:
                if at.offset <= last.offset:
                    return  # had it already (from history, during a repair)
                if at.offset > last.offset + 1:  # a gap: messages this session never saw
                    held = self._repairs[name] = []
                    self._hold(name, held, (body, text, at, origin))
                    self._start_repair(name)
                    return
            elif at.epoch == trail.retired:
                return  # renumbered: it comes from history in the new epoch
        if self._subscribed(name):
            if trail is None:
                trail = self._trails[name] = Trail(at)
            trail.delivered(at, body, text)
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
            trail = self._trails.get(name)
            if trail is None or not self._subscribed(name):
                break
            try:
                if not checked:  # does Redis still hold what this instance delivered?
                    await self._check(name, trail)
                    checked = True
                last = trail.at
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
                trail.moved(found.top)
            else:
                for entry in found.entries:
                    at = Position(entry.offset, found.top.epoch)
                    trail.delivered(at, entry.payload, entry.text)
                    self._hand(name, entry.payload, entry.text, at, 0)
                if len(found.entries) == CHUNK:
                    continue
            del self._repairs[name]
            self._repair_bytes.pop(name, None)
            for body, text, at, origin in held:  # may find a gap again, and hold anew
                self._numbered(name, body, text, at, origin)
            return

    async def _check(self, name: str, trail: Trail) -> None:
        """Redis lost messages this instance delivered, or holds other ones at their
        offsets (a failover to a replica that lagged, and another instance published on
        the new primary before this one looked): the channel is renumbered in a new epoch
        (by this instance, or by another first) and the trail moves to where what differs
        starts in it, so the recovery that follows delivers it."""
        keys = history_keys(name)
        for _ in range(2):  # one more look if another instance renumbered it meanwhile
            last, window = trail.at, trail.window()
            look = looked(
                await self._read(
                    name, ("EVALSHA", LOOK_SHA, 2, *keys, last.epoch, window.start, len(window))
                )
            )
            if look is None or look.entries is None:
                return  # a new channel or an unrelated epoch: the recovery says so
            differs = first_difference(trail, look)
            # Every remembered message differs: others before them may have, unknown here.
            unsure = differs == window.start and len(window) == WINDOW
            if look.epoch != last.epoch:  # renumbered by another instance
                self._renumbered(name, trail, look, differs, unsure=unsure)
                return
            if differs is None and look.top >= last.offset:
                return  # Redis holds what was delivered
            since = last.offset + 1 if differs is None else differs
            diverge = (last.epoch, last.offset, since, new_epoch(), META_TTL)
            answer = await self._read(name, ("EVALSHA", DIVERGE_SHA, 2, *keys, *diverge))
            if answer:
                epoch, before = answer[0].decode(), int(answer[1])
                look = Look(epoch, 0, before + 1 - since, since, {})
                self._renumbered(name, trail, look, since, unsure=unsure)
                return

    def _renumbered(
        self, name: str, trail: Trail, look: Look, differs: int | None, *, unsure: bool
    ) -> None:
        """The trail follows its epoch's renumbering: on from the first message that
        differs (or the next), and what the renumbering did not keep is lost here."""
        since = trail.at.offset + 1 if differs is None else differs
        lost = max(0, look.kept - since)
        self.counts["lost"] += lost
        self._warn.warning(
            "history in redis differs from what was delivered: renumbered in a new epoch",
            channel=name, since=since, lost=lost, earlier_unknown=unsure,
        )  # fmt: skip
        trail.retired = trail.at.epoch
        trail.moved(Position(max(since, look.kept) - 1 + look.shift, look.epoch))
