"""What comes back from Redis on its way to the relay: each envelope checked (what is not
wsechod's is dropped and counted as malformed), an instance's own messages recognised, and
for channels with history, offset order kept. A gap in a channel (messages a broken
session never saw) is repaired from the channel's stream, after asking Redis whether it
still holds what this instance delivered (``LOOK``, with the ids its ``Trail`` keeps): if
it lost some, or numbered other messages with their offsets, the channel goes on in a new
epoch (``DIVERGE``, or this instance follows where another did it) and this instance
delivers what differs. Live messages that arrive meanwhile are held (at most
``REPAIR_BACKLOG`` bytes a channel, beyond which they are read from the stream again), then
delivered, each once: a message is known by its id, and one of this instance's own keeps
its publishing member when it comes from history instead."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from wsechod.brokers.base import Deliver
from wsechod.brokers.format import (
    BINARY,
    CHAIN,
    CONTROL,
    DIVERGE_SHA,
    HEAD,
    ID_SIZE,
    LOOK_SHA,
    MAGIC,
    MESSAGE_ID_SIZE,
    META_TTL,
    ORIGIN_SIZE,
    TEXT,
    channel_of,
    history_keys,
)
from wsechod.brokers.trail import Trail
from wsechod.history import History, Position, Recovery, new_epoch
from wsechod.ratelimit import RateLimitedLog

REPAIR_BACKLOG = 4 * 2**20  # bytes of live messages held per channel while it is repaired
OVERHEAD = 64  # bytes counted per held message besides its payload (the Python objects)
CHUNK = 256  # entries read at a time while a channel is repaired
LOOKS = 4  # times a repair asks whether Redis holds what was delivered (epochs change)
ANY_HISTORY = History(1, 1.0)  # Redis trims its streams itself: recover() needs no policy
OWN_KEPT = 65_536  # own messages with history remembered on their way (ids and members)
ORIGIN_AT = HEAD - MESSAGE_ID_SIZE - ORIGIN_SIZE

# A message with history held while its channel is repaired: payload, text, where, origin,
# its id.
Held = tuple[bytes, bool, Position, int, int]
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
        run_id: Callable[[str], str],
    ) -> None:
        self.instance = instance
        self.counts = counts
        self.deliver: Deliver | None = None
        self._warn = warn
        self._subscribed = subscribed
        self._read = read
        self._recover = recover
        self._run_id = run_id
        self._trails: dict[str, Trail] = {}  # per channel with history: what was delivered
        self._repairs: dict[str, list[Held]] = {}
        self._repair_bytes: dict[str, int] = {}
        self._repairing: set[asyncio.Task[None]] = set()
        # This instance's messages with history on their way, by id: their publishing
        # member, for the one that comes from history before its live copy.
        self._own: dict[int, int] = {}

    def published(self, message_id: int, origin: int) -> None:
        """A message of this instance's member ``origin``, with history, is on its way."""
        self._own[message_id] = origin
        if len(self._own) > OWN_KEPT:  # lost on the way (Redis failed): the oldest go
            del self._own[next(iter(self._own))]

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
        origin = int.from_bytes(payload[ORIGIN_AT : HEAD - MESSAGE_ID_SIZE], "big") if own else 0
        message_id = int.from_bytes(payload[HEAD - MESSAGE_ID_SIZE : HEAD], "big")
        self._numbered(name, (body, kind == TEXT, at, origin, message_id))

    def _numbered(self, name: str, message: Held) -> None:
        """A message with history, in offset order: once (not again after a repair), and
        a gap in its channel is repaired from history first."""
        held = self._repairs.get(name)
        if held is not None:  # being repaired: it waits for that
            self._hold(name, held, message)
            return
        body, text, at, origin, message_id = message
        trail = self._trails.get(name)
        if trail is not None:
            last = trail.at
            if last.epoch == at.epoch:
                if at.offset <= last.offset:
                    return  # had it already (from history, during a repair)
                if at.offset > last.offset + 1:  # a gap: messages this session never saw
                    held = self._repairs[name] = []
                    self._hold(name, held, message)
                    self._start_repair(name)
                    return
            elif at.epoch in trail.retired:
                return  # its epoch was replaced: it comes from history in the new one
        if self._subscribed(name):
            if trail is None:
                trail = self._trails[name] = Trail(at)
            trail.delivered(at, message_id)
        if origin:
            self._own.pop(message_id, None)
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

    def _drop_repair(self, name: str) -> list[Held] | None:
        self._repair_bytes.pop(name, None)
        return self._repairs.pop(name, None)

    async def _repair(self, name: str) -> None:
        """Deliver what history holds after the last message delivered in ``name``, then
        what was held meanwhile; what history no longer holds is lost, and said so."""
        looks = 0  # LOOKs made: one first, more if the epoch changes under the repair
        known: set[int] = set()  # ids delivered before: not again, whatever their offset
        while name in self._repairs:
            trail = self._trails.get(name)
            if trail is None or not self._subscribed(name):
                # Nobody here: nothing held for anyone; or somebody new, since the last
                # left: what is held is theirs, from where they came.
                for message in self._drop_repair(name) or ():
                    if self._subscribed(name):
                        self._numbered(name, message)
                return
            try:
                if looks == 0:
                    known = trail.known()
                    await self._check(name, trail)
                    looks = 1
                last = trail.at
                found = await self._recover(name, last, CHUNK, ANY_HISTORY)
            except ConnectionError:
                return  # the session is over; the next one repairs again
            if found.entries is None and found.top.epoch != last.epoch and looks < LOOKS:
                looks += 1  # replaced since the look (another instance), or a new channel
                try:
                    await self._check(name, trail)
                except ConnectionError:
                    return
                continue
            if found.entries is None:
                behind = found.top.offset - last.offset  # Redis may be behind, not ahead
                self.counts["lost"] += max(0, behind) if found.top.epoch == last.epoch else 0
                self._warn.warning(
                    "history could not fill a gap", channel=name, since=last.offset,
                    top=found.top.offset, epoch_changed=found.top.epoch != last.epoch,
                )  # fmt: skip
                trail.moved(found.top)
            else:
                self._from_history(name, trail, found, known)
                if len(found.entries) == CHUNK:
                    continue
            for message in self._drop_repair(name) or ():  # may find a gap, and hold anew
                self._numbered(name, message)
            return

    def _from_history(self, name: str, trail: Trail, found: Recovery, known: set[int]) -> None:
        """Hand what history held on; this instance's own messages keep their publishing
        member."""
        assert found.entries is not None
        if found.top.epoch != trail.at.epoch:  # READ continued it in the epoch that replaced it
            trail.retire(trail.at.epoch)
        for entry in found.entries:
            at = Position(entry.offset, found.top.epoch)
            trail.delivered(at, entry.message_id)
            if entry.message_id not in known:
                origin = self._own.pop(entry.message_id, 0)
                self._hand(name, entry.payload, entry.text, at, origin)

    async def _check(self, name: str, trail: Trail) -> None:
        """Does Redis still hold what this instance delivered? If it lost messages, or
        holds other ones at their offsets (a failover to a replica that lagged, and
        another instance published on the new primary before this one looked), the
        channel goes on in a new epoch, started here or by another instance first, and
        the trail moves to before the first message that differs, for the recovery that
        follows to deliver it. A channel Redis lost whole is delivered from its start."""
        keys = history_keys(name)
        for _ in range(3):  # looks again if another instance replaced the epoch meanwhile
            epoch, last, first, ids, retired = trail.look()
            run_id = self._run_id(name)
            look = await self._read(
                name, ("EVALSHA", LOOK_SHA, 2, *keys, epoch, last, first, ids, retired, run_id)
            )
            if not look:
                return  # the hash is gone: the recovery finds a new epoch and looks again
            now = was = look[0].decode()
            if len(look) == 2:  # an unrelated epoch: Redis lost the channel
                self._warn.warning("history lost by redis: a new epoch", channel=name)
                trail.moved(Position(0, now))
                return
            differs, sure, passed = int(look[2]), look[3] == 1, look[4].decode().split()
            # The first that differs is the first of the window: others may have before.
            unsure = not sure and differs == first and first > 1
            if differs and (now == epoch or now in trail.retired):  # ours, or one gone back to
                now = new_epoch()
                diverge = (was, 0 if unsure else differs, now, META_TTL, CHAIN, run_id)
                if not await self._read(name, ("EVALSHA", DIVERGE_SHA, 2, *keys, *diverge)):
                    continue  # another instance replaced it first: look again
            elif now == epoch:
                return  # Redis holds what was delivered
            if differs:
                self._warn.warning(
                    "history in redis differs from what was delivered: a new epoch",
                    channel=name, since=differs, started_here=now != was,
                    earlier_unknown=unsure,
                )  # fmt: skip
            trail.replaced(now, differs or last + 1, was=was)
            trail.retire(*passed)  # replaced on the way: Redis may go back to one of them
            return
