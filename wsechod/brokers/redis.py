"""Redis pub/sub between instances, on redis-py's asyncio connections driven directly.

What of redis-py this uses, all public (no underscore) and documented in its API reference
(tested with redis-py 8.2; ``tests/test_relay.py`` checks these calls on the installed
version, so a release that changes them fails there, not in production):
``ConnectionPool.from_url`` and ``ConnectionPool.get_connection`` (a connected connection
with the URL's credentials and database), and on that connection ``send_command``,
``send_packed_command``, ``pack_commands``, ``read_response`` and ``disconnect``. The
client classes (``Redis``, ``PubSub``, pipelines) are not used: they retry, check health
and reconnect on their own, and a retried PUBLISH can be delivered twice.

Each instance subscribes only to the channels it has members on (Redis channel
``wsechod:{<path>}``: the hash tag keeps a channel's keys on one Cluster shard) and
publishes each relayed message once, in an envelope: a marker and version (``MAGIC``), its
own random id, the frame type, the publishing member (``origin``) and its position in
history (``0 -`` without), so it can ignore its own messages when Redis echoes them back
(a client never gets a message twice) and drop, as malformed, what anyone else publishes
there. Nothing is retried, so delivery between instances is at most once, and every loss
is counted (``stats()``) and logged, rate-limited.

History (``history.py``): a channel's messages are numbered, kept and published in one
atomic step (``APPEND``: HINCRBY on the channel's hash ``wsechod:{<path>}:m``, XADD to its
stream ``wsechod:{<path>}:h`` with the offset as the entry's id, PUBLISH), so every
instance, this one included, delivers them in offset order as they come back; a hash that
is gone (flushed, expired, a restart without persistence) is a new epoch. After a session
with Redis starts again, each channel with history is read from where this instance was,
so its members get what was published meanwhile (live messages wait for it), and nothing
twice. A third connection, the reader, serves ``recover`` (members catching up).

A session with Redis is two connections: the subscriber (SUBSCRIBE, and a PING every
``PING_INTERVAL`` that Redis must answer within ``PING_TIMEOUT``) and the publisher
(pipelined PUBLISH batches, answered within ``PUBLISH_TIMEOUT``). Every wait on Redis has a
deadline, because a hung Redis (stopped, swapping, partitioned) answers nothing and closes
nothing: without deadlines it would look healthy forever. Any failure ends the session:
both connections are dropped, the state (``unreachable``: refused, reset, authentication;
``unresponsive``: a deadline passed) shows in ``degraded()`` and is logged once, and the
broker reconnects with backoff, silently until the state changes, then resubscribes.

Publishing never blocks the relay: messages wait in an outbox for the publisher task. While
Redis is healthy and the outbox holds more than ``HIGH_WATER`` bytes, ``writable()`` is
False and the relay stops reading its publishers until it is back under ``LOW_WATER``, so a
fast publisher is paced to what Redis takes instead of losing messages. While Redis is
degraded nothing is paced (local relay goes on at full speed) and messages for other
instances are dropped and counted.
"""

import asyncio
import contextlib
import hashlib
import math
import os
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsechod.brokers.base import Deliver, Members, PresenceUnavailable, Snapshot
from wsechod.brokers.presence import RedisPresence, Unavailable
from wsechod.history import History, Position, Recovery, Stored, continued, new_epoch
from wsechod.log import get_logger
from wsechod.ratelimit import RateLimitedLog
from wsechod.settings.values import redact_url

log = get_logger("wsechod.broker")

PREFIX = "wsechod:"
CONTROL = PREFIX + "\0control"  # always subscribed: keeps the subscriber in pub/sub mode
MAGIC = b"WSE\x02"  # the envelope's marker and version
TEXT, BINARY = b"t", b"b"
ID_SIZE = 8
ORIGIN_SIZE = 8
# marker, instance id, frame type, origin; then "<offset> <epoch>\n" and the payload
HEAD = len(MAGIC) + ID_SIZE + 1 + ORIGIN_SIZE
UNNUMBERED = b"0 -\n"
META_TTL = 86_400  # seconds a channel's position outlives its last message, at least
REPAIR_BACKLOG = 4 * 2**20  # bytes of live messages held per channel while it is repaired

# KEYS: the channel's hash and stream. ARGV: the Redis channel, the frame type and payload,
# the stream's length, its ttl, the hash's ttl, a fresh epoch, the envelope's head.
APPEND = """
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('DEL', KEYS[2])
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], o .. '-0', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[7] .. o .. ' ' .. e .. '\\n' .. string.sub(ARGV[2], 2))
return {o, e}
"""
# KEYS: the hash and the stream. ARGV: a fresh epoch, the hash's ttl, the offset to read
# after ("": none), at most how many. Returns the epoch, the top offset, the entries.
READ = """
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
end
local o = redis.call('HGET', KEYS[1], 'o') or '0'
local found = {}
if ARGV[3] ~= '' then
  found = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3] .. '-0', '+', 'COUNT', ARGV[4])
end
return {e, o, found}
"""

# Deadlines, in seconds. Redis answers a PING in well under a millisecond; a second and a
# half without an answer is a hang, not load. Detection takes at most about
# PING_INTERVAL + PING_TIMEOUT + GRACE (2.6 s).
CONNECT_TIMEOUT = 2.0  # TCP connect, AUTH, SELECT and a first PING
PING_INTERVAL = 1.0
PING_TIMEOUT = 1.5
PUBLISH_TIMEOUT = 2.0  # for one batch (at most BATCH_BYTES) to be answered
GRACE = 0.1  # a late answer is looked for once more: a stalled event loop is not a hung Redis
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
CLOSE_TIMEOUT = 1.0

# The outbox, in bytes: payload + channel name + OVERHEAD per message (the Python objects),
# so that many tiny messages are bounded too.
HIGH_WATER = 2**20  # above it (Redis healthy), publishers are paced...
LOW_WATER = 256 * 2**10  # ...until the outbox is back under this
OUTBOX_LIMIT = 16 * 2**20  # beyond it messages are dropped (callers that ignore writable())
OVERHEAD = 64
BATCH_BYTES = 256 * 2**10  # one pipelined round trip carries at most this...
BATCH_MESSAGES = 1024  # ...and this many messages

# KEYS: the hash and the stream. ARGV: the epoch and offset this instance delivered up to,
# a fresh epoch, the hash's ttl. A hash behind what was delivered lost messages (Redis
# restarted from an older copy, or failed over to a replica that lagged): its offsets
# would be used again for other messages, so the channel gets a new epoch, and its
# offsets go on from where they were.
CHECK = """
local e = redis.call('HGET', KEYS[1], 'e')
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
if e == ARGV[1] and o < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[3], 'o', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
SCRIPTS = (APPEND, READ, CHECK)
APPEND_SHA, READ_SHA, CHECK_SHA = (hashlib.sha1(s.encode()).hexdigest() for s in SCRIPTS)
CHUNK = 256  # entries read at a time while a channel is repaired
ANY_HISTORY = History(1, 1.0)  # Redis trims its streams itself: recover() needs no policy

CONNECTING, CONNECTED = "connecting", "connected"
UNREACHABLE, UNRESPONSIVE, CLOSED = "unreachable", "unresponsive", "closed"


# What the outbox holds: a command, its size, and the future of a message with history.
Queued = tuple[tuple[Any, ...], int, "asyncio.Future[Position | None] | None"]
# A message with history held while its channel is repaired: payload, text, where, origin.
Held = tuple[bytes, bool, Position, int]


def channel_key(channel: str) -> str:
    """A channel's Redis channel, and the prefix of its keys (``:m``, ``:h``)."""
    return f"{PREFIX}{{{channel}}}"


def _answered(
    future: "asyncio.Future[Position | None] | None", value: Position | None
) -> "asyncio.Future[Position | None] | None":
    if future is not None and not future.done():
        future.set_result(value)
    return future


class _Down(Exception):
    """The session with Redis is over: the state it leaves the broker in, and why."""

    def __init__(self, state: str, error: str, kind: str) -> None:
        super().__init__(error)
        self.state, self.error, self.kind = state, error, kind


class RedisBroker:
    def __init__(self, url: str, *, presence_interval: float = 10.0) -> None:
        self.url = url
        self.shown = redact_url(url)  # the only form of the URL that reaches a log
        password = urllib.parse.urlsplit(url).password
        self._secret = urllib.parse.unquote(password) if password else None
        self.id = os.urandom(ID_SIZE)
        self.presence = RedisPresence(url, self.id.hex(), presence_interval)
        self.channels: set[str] = set()
        self.state = CONNECTING
        self.counts = dict.fromkeys(
            ("published", "delivered", "lost", "unconfirmed", "failed", "malformed", "reconnects"),
            0,
        )
        self._warn = RateLimitedLog(log)
        self._deliver: Deliver | None = None
        self._task: asyncio.Task[None] | None = None
        self._outcome: asyncio.Future[None] | None = None  # the first attempt's
        self._outbox: deque[Queued] = deque()
        self._reads: asyncio.Queue[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None
        self._last: dict[str, Position] = {}  # per channel with history: delivered up to
        self._repairs: dict[str, list[Held]] = {}
        self._repair_bytes: dict[str, int] = {}
        self._repairing: set[asyncio.Task[None]] = set()
        self._queued = 0  # bytes in the outbox and in flight
        self._paused = False  # above HIGH_WATER, not yet back under LOW_WATER
        self._waiters: list[Callable[[], None]] = []
        self._mail = asyncio.Event()  # the outbox is not empty
        self._changed = asyncio.Event()  # local channels changed
        self._pong = asyncio.Event()
        self._ping_seq = self._ponged = 0
        self._logged: tuple[str, str] | None = None  # the failure last logged
        self._down_since: float | None = None
        self._lost_before = 0  # counts["lost"] when the outage began
        self._unconfirmed_before = 0  # counts["unconfirmed"] when the session began
        self._ever_connected = False

    # --- the Broker interface -------------------------------------------------------------

    async def start(self, deliver: Deliver, snapshot: Snapshot) -> None:
        """Start connecting; return once the first attempt succeeded or failed (bounded),
        so that a normal start is not reported degraded and a bad URL, port or password
        is logged before ``listening``."""
        self._deliver = deliver
        self._outcome = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="redis broker")
        self.presence.start(snapshot)
        await asyncio.wait([self._outcome], timeout=2 * CONNECT_TIMEOUT + PING_TIMEOUT + 1)

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self._changed.set()

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self._last.pop(channel, None)
        self._changed.set()

    def publish(
        self,
        channel: str,
        payload: bytes,
        text: bool,
        *,
        history: History | None = None,
        origin: int = 0,
    ) -> "asyncio.Future[Position | None] | None":
        stored: asyncio.Future[Position | None] | None = None
        if history is not None:
            stored = asyncio.get_running_loop().create_future()
        if self.state != CONNECTED:
            self.counts["lost"] += 1
            if self.state != CLOSED:
                lost = self.counts["lost"]
                self._warn.warning(f"broker {self.state}: message not sent", lost=lost)
            return _answered(stored, None)
        kind = TEXT if text else BINARY
        head = b"".join((MAGIC, self.id, kind, origin.to_bytes(ORIGIN_SIZE, "big")))
        name = channel_key(channel)
        command: tuple[Any, ...]
        if history is None:
            command = ("PUBLISH", name, head + UNNUMBERED + payload)
        else:
            ttl = max(1, math.ceil(history.ttl))
            command = (
                "EVALSHA", APPEND_SHA, 2, name + ":m", name + ":h",
                name, kind + payload, history.size, ttl, max(ttl, META_TTL), new_epoch(), head,
            )  # fmt: skip
        size = len(payload) + 2 * len(name) + len(head) + OVERHEAD
        if self._queued + size > OUTBOX_LIMIT:
            self.counts["lost"] += 1
            lost = self.counts["lost"]
            self._warn.warning("broker outbox full: message dropped", limit=OUTBOX_LIMIT, lost=lost)
            return _answered(stored, None)
        self._outbox.append((command, size, stored))
        self._queued += size
        if self._queued > HIGH_WATER:
            self._paused = True
        self._mail.set()
        return stored

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        """Read by the session's reader (ConnectionError while there is none)."""
        name = channel_key(channel)
        after = "" if since is None else str(since.offset)
        command = (
            "EVALSHA",
            READ_SHA,
            2,
            name + ":m",
            name + ":h",
            new_epoch(),
            META_TTL,
            after,
            limit,
        )
        reply = await self._read_now(command)
        epoch, top, found = reply
        entries = [
            Stored(int(entry_id.split(b"-")[0]), fields[1][1:], fields[1][:1] == TEXT)
            for entry_id, fields in found
        ]
        return continued(since, Position(int(top), epoch.decode()), entries)

    async def _read_now(self, command: tuple[Any, ...]) -> Any:
        reads = self._reads
        if reads is None or self.state != CONNECTED:
            raise ConnectionError(f"broker {self.state}")
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        reads.put_nowait((command, answer))
        return await answer

    def writable(self) -> bool:
        return not self._paused or self.state != CONNECTED

    def when_writable(self, callback: Callable[[], None]) -> None:
        if self.writable():
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._waiters.append(callback)

    def degraded(self) -> str | None:
        return None if self.state == CONNECTED else f"redis broker {self.state}"

    def stats(self) -> dict[str, int]:
        """published: answered by Redis; delivered: from other instances to local members;
        lost: never sent (Redis down, outbox full, or queued when the session failed);
        unconfirmed: sent, but the session failed before Redis answered (maybe relayed);
        failed: refused by Redis (an error reply); malformed: not ours to read;
        reconnects: sessions after the first."""
        return dict(self.counts)

    def presence_changed(self) -> None:
        self.presence.changed()

    async def channel_counts(self) -> dict[str, int]:
        try:
            return await self.presence.channels()
        except Unavailable as exc:
            raise PresenceUnavailable(str(exc)) from None

    async def channel_members(self, channel: str) -> Members:
        try:
            return await self.presence.members(channel)
        except Unavailable as exc:
            raise PresenceUnavailable(str(exc)) from None

    async def close(self) -> None:
        """Stop relaying through Redis; dropping the subscriber connection unsubscribes.
        This instance's presence goes at once."""
        await self.presence.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=CLOSE_TIMEOUT)
        self._discard()
        self.state = CLOSED
        self._wake()
        self._warn.flush()
        log.info("broker closed", url=self.shown, **self.counts)

    # --- sessions -------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except _Down as down:
                if self.state == CONNECTED:
                    backoff = BACKOFF_MIN
                self._went_down(down)
            except Exception as exc:  # a bug must not end cross-instance relay for good
                log.exception("broker session failed")
                self._went_down(_Down(UNREACHABLE, repr(exc), "bug"))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        """Connect, then read, ping and publish until something fails (raises ``_Down``)."""
        conns: list[AbstractConnection] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for _ in range(3):
                conns.append(await self._open())
            subscriber, publisher, reader = conns
            await self._load_scripts(reader)
            for channel in self._last:  # hold its live messages until it is repaired
                self._repairs.setdefault(channel, [])
            self._reads = asyncio.Queue()
            tasks = [
                asyncio.create_task(self._read(subscriber)),
                asyncio.create_task(self._keepalive(subscriber)),
                asyncio.create_task(self._send(publisher)),
                asyncio.create_task(self._serve_reads(reader, self._reads)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise _Down(UNREACHABLE, "session ended", "bug")  # the tasks never return
        finally:
            self._end_reads()
            for task in [*tasks, *self._repairing]:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in tasks:  # a second failure is a consequence of the first: no report
                if task.done() and not task.cancelled():
                    task.exception()
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    async def _open(self) -> AbstractConnection:
        """A connection that has answered a PING, within CONNECT_TIMEOUT. No retries and no
        timeouts inside redis-py: a retried PUBLISH can be delivered twice, and our own
        deadlines cover every wait."""
        try:
            pool = ConnectionPool.from_url(
                self.url,
                socket_timeout=None,
                socket_connect_timeout=CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
                protocol=2,  # pub/sub replies as plain replies (RESP3 hands them to a hook)
            )
        except (ValueError, TypeError) as exc:
            raise _Down(UNREACHABLE, self._scrub(f"invalid broker URL: {exc}"), "url") from None
        conn: AbstractConnection | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                await conn.send_command("PING", check_health=False)
                await conn.read_response()
        except BaseException as exc:  # cancelled too: never leave a socket behind
            with contextlib.suppress(Exception):
                await pool.disconnect()
            if isinstance(exc, RedisError | OSError):
                raise self._failure(exc, CONNECT_TIMEOUT) from None
            raise
        return conn

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        """The scripts, by their SHA-1 from then on (a restarted Redis has none)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                for script in SCRIPTS:
                    await conn.send_command("SCRIPT", "LOAD", script, check_health=False)
                    await conn.read_response()
        except TimeoutError:
            raise _Down(UNRESPONSIVE, "no answer to SCRIPT LOAD", "timeout") from None
        except (RedisError, OSError) as exc:
            raise self._failure(exc, CONNECT_TIMEOUT) from None

    async def _serve_reads(
        self,
        conn: AbstractConnection,
        reads: "asyncio.Queue[tuple[tuple[Any, ...], asyncio.Future[Any]]]",
    ) -> None:
        """History reads, one at a time, each answered within PUBLISH_TIMEOUT."""
        while True:
            command, answer = await reads.get()
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await conn.send_command(*command, check_health=False)
                    reply = await conn.read_response()
            except TimeoutError:
                answer.set_exception(ConnectionError("history read timed out"))
                raise _Down(
                    UNRESPONSIVE, f"no answer to a read within {PUBLISH_TIMEOUT:g} s", "timeout"
                ) from None
            except ResponseError as exc:  # e.g. an ACL without EVALSHA
                self._warn.warning("broker refused a history read", error=str(exc))
                answer.set_exception(ConnectionError(f"history read refused: {exc}"))
                continue
            except (RedisError, OSError) as exc:
                answer.set_exception(ConnectionError(f"history read failed: {exc}"))
                raise self._failure(exc, PUBLISH_TIMEOUT) from None
            if not answer.done():
                answer.set_result(reply)

    def _end_reads(self) -> None:
        """Reads still waiting fail: the session is over."""
        reads, self._reads = self._reads, None
        while reads is not None and not reads.empty():
            _, answer = reads.get_nowait()
            if not answer.done():
                answer.set_exception(ConnectionError("broker session ended"))
        self._repairs.clear()
        self._repair_bytes.clear()

    def _failure(self, exc: BaseException, deadline: float) -> _Down:
        if isinstance(exc, TimeoutError | RedisTimeoutError):  # ours, or the TCP connect's
            return _Down(UNRESPONSIVE, f"no answer within {deadline:g} s", "timeout")
        if isinstance(exc, AuthenticationError):
            return _Down(UNREACHABLE, self._scrub(f"authentication failed: {exc}"), "auth")
        error = str(exc) or type(exc).__name__
        return _Down(UNREACHABLE, self._scrub(error), type(exc).__name__)

    def _scrub(self, text: str) -> str:
        """No password in a log line, even if an error message quotes one."""
        return text if not self._secret else text.replace(self._secret, "***")

    async def _read(self, conn: AbstractConnection) -> None:
        """The subscriber's replies: messages, and the answers to our pings. No deadline
        here: the pings are what notices a Redis that has gone quiet."""
        while True:
            try:
                reply = await conn.read_response()
            except (RedisError, OSError) as exc:
                raise self._failure(exc, PING_TIMEOUT) from None
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            if reply[0] == b"message" and len(reply) == 3:
                self._received(reply[1], reply[2])
            elif reply[0] == b"pong":
                with contextlib.suppress(ValueError):
                    self._ponged = max(self._ponged, int(reply[1]))
                    self._pong.set()

    async def _keepalive(self, conn: AbstractConnection) -> None:
        """Follow local joins and leaves, and ping; each round ends with a PING, whose
        answer also confirms the (un)subscriptions sent before it."""
        loop = asyncio.get_running_loop()
        subscribed: set[str] | None = None  # None: not even CONTROL yet
        while True:
            began = loop.time()
            self._changed.clear()
            wanted = set(self.channels)
            commands: list[tuple[Any, ...]] = []
            added = wanted - (subscribed or set())
            if subscribed is None or added:
                extra = [CONTROL] if subscribed is None else []
                commands.append(("SUBSCRIBE", *extra, *(channel_key(c) for c in sorted(added))))
            if removed := (subscribed or set()) - wanted:
                commands.append(("UNSUBSCRIBE", *(channel_key(c) for c in sorted(removed))))
            self._ping_seq += 1
            commands.append(("PING", str(self._ping_seq)))
            await self._round_trip(conn, commands, self._ping_seq)
            if subscribed is None:
                self._up()
            if wanted != subscribed:
                log.debug("broker subscriptions", channels=sorted(wanted))
            subscribed = wanted
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, began + PING_INTERVAL - loop.time())):
                    await self._changed.wait()

    async def _round_trip(
        self, conn: AbstractConnection, commands: list[tuple[Any, ...]], seq: int
    ) -> None:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                while self._ponged < seq:
                    self._pong.clear()
                    await self._pong.wait()
        except TimeoutError:
            await asyncio.sleep(GRACE)  # the answer may be waiting behind a stalled loop
            if self._ponged < seq:
                raise _Down(
                    UNRESPONSIVE, f"no answer to PING within {PING_TIMEOUT:g} s", "timeout"
                ) from None
        except (RedisError, OSError) as exc:
            raise self._failure(exc, PING_TIMEOUT) from None

    async def _send(self, conn: AbstractConnection) -> None:
        """Publish the outbox in pipelined batches, in order, each within PUBLISH_TIMEOUT."""
        while True:
            while not self._outbox:
                self._mail.clear()
                try:
                    async with asyncio.timeout(PING_INTERVAL):
                        await self._mail.wait()
                except TimeoutError:
                    await self._idle_ping(conn)
            batch: list[Queued] = []
            size = 0
            while self._outbox and len(batch) < BATCH_MESSAGES and size < BATCH_BYTES:
                batch.append(self._outbox.popleft())
                size += batch[-1][1]
            answered = 0
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    packed = conn.pack_commands([command for command, _, _ in batch])
                    await conn.send_packed_command(packed, check_health=False)
                    for _, _, stored in batch:
                        try:
                            reply = await conn.read_response()
                            self.counts["published"] += 1
                            if stored is not None:
                                _answered(stored, Position(int(reply[0]), reply[1].decode()))
                        except ResponseError as exc:  # e.g. an ACL without PUBLISH rights
                            self.counts["failed"] += 1
                            self._warn.warning("broker refused a message", error=str(exc))
                            _answered(stored, None)
                        answered += 1
            except TimeoutError:
                raise _Down(
                    UNRESPONSIVE, f"no answer to PUBLISH within {PUBLISH_TIMEOUT:g} s", "timeout"
                ) from None
            except (RedisError, OSError) as exc:
                raise self._failure(exc, PUBLISH_TIMEOUT) from None
            finally:
                self.counts["unconfirmed"] += len(batch) - answered
                for _, _, stored in batch[answered:]:
                    _answered(stored, None)
                self._queued -= size
                if self._paused and self._queued <= LOW_WATER:
                    self._paused = False
                    self._wake()

    async def _idle_ping(self, conn: AbstractConnection) -> None:
        """An idle publisher connection is pinged too: Redis's ``timeout`` would close it,
        and the next message would be lost finding out."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await conn.send_command("PING", check_health=False)
                await conn.read_response()
        except (RedisError, OSError) as exc:
            raise self._failure(exc, PUBLISH_TIMEOUT) from None

    def _received(self, channel: object, payload: object) -> None:
        if not isinstance(payload, bytes) or not isinstance(channel, bytes):
            return
        if channel == CONTROL.encode():
            return  # ours to stay in pub/sub mode, not a channel's
        own = payload[len(MAGIC) : len(MAGIC) + ID_SIZE] == self.id
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
            name = channel.decode()[len(PREFIX) + 1 : -1]
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
        if name in self.channels:
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
        assert self._deliver is not None
        try:
            if self._deliver(name, body, text, at, origin) and not origin:
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
            if last is None or name not in self.channels:
                break
            try:
                if not checked:  # has Redis lost what this instance delivered?
                    keys = (channel_key(name) + ":m", channel_key(name) + ":h")
                    check = (*keys, last.epoch, last.offset, new_epoch(), META_TTL)
                    await self._read_now(("EVALSHA", CHECK_SHA, 2, *check))
                    checked = True
                found = await self.recover(name, last, CHUNK, ANY_HISTORY)
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

    # --- state ----------------------------------------------------------------------------

    def _up(self) -> None:
        self.state = CONNECTED
        self._logged = None
        self._unconfirmed_before = self.counts["unconfirmed"]
        fields: dict[str, Any] = {"url": self.shown, "channels": len(self.channels)}
        if self._ever_connected:
            self.counts["reconnects"] += 1
        if self._down_since is not None:
            fields["down_seconds"] = round(time.monotonic() - self._down_since, 1)
            fields["lost"] = self.counts["lost"] - self._lost_before
            self._down_since = None
        self._ever_connected = True
        log.info("broker connected", **fields)
        for name in list(self._repairs):  # subscribed again: read what was missed
            self._start_repair(name)
        self._settle()

    def _went_down(self, down: _Down) -> None:
        """Log a new kind of failure once (a retry failing the same way stays quiet)."""
        was_connected = self.state == CONNECTED
        self.state = down.state
        discarded = self._discard()
        unconfirmed = self.counts["unconfirmed"] - self._unconfirmed_before
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._lost_before = self.counts["lost"] - discarded
        if (down.state, down.kind) != self._logged:
            self._logged = down.state, down.kind
            fields: dict[str, Any] = {"url": self.shown, "error": down.error}
            if was_connected:  # what this failure cost: queued, and sent but unanswered
                fields.update(discarded=discarded, unconfirmed=unconfirmed)
            log.warning(f"broker {down.state}", **fields)
        else:
            log.debug("broker retry failed", url=self.shown, error=down.error)
        self._settle()

    def _discard(self) -> int:
        """Empty the outbox (Redis is gone), counting its messages as lost."""
        discarded = len(self._outbox)
        self._queued -= sum(size for _, size, _ in self._outbox)
        for _, _, stored in self._outbox:
            _answered(stored, None)
        self._outbox.clear()
        self.counts["lost"] += discarded
        self._paused = False
        return discarded

    def _settle(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self.writable():
            loop = asyncio.get_running_loop()
            for callback in self._waiters:
                loop.call_soon(callback)
            self._waiters.clear()
