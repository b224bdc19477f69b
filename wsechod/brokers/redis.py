"""Redis pub/sub between instances, on redis-py's asyncio connections driven directly.

What of redis-py this uses, all public (no underscore) and documented in its API reference
(tested with redis-py 8.2; ``tests/test_relay.py`` checks these calls on the installed
version, so a release that changes them fails there, not in production): connections from
``topology.connect`` (``ConnectionPool.from_url``, ``get_connection``), and on them
``send_command``, ``send_packed_command``, ``pack_commands``, ``read_response`` and
``disconnect``. The client classes (``Redis``, ``PubSub``, pipelines) are not used here:
they retry, check health and reconnect on their own, and a retried PUBLISH can be
delivered twice.

Each instance subscribes only to the channels it has members on and publishes each relayed
message once, in the envelope of ``format.py``, so it can ignore its own messages when
Redis echoes them back (a client never gets a message twice) and drop, as malformed, what
anyone else publishes there. Nothing is retried, so delivery between instances is at most
once, and every loss is counted (``stats()``) and logged, rate-limited.

History (``history.py``): a channel's messages are numbered, kept and published in one
atomic step (the ``APPEND`` script), so every instance, this one included, delivers them in
offset order as they come back; a hash that is gone (flushed, expired, a restart without
persistence) is a new epoch. After a session with Redis starts again, each channel with
history is checked (``LOOK``: does Redis still hold what was delivered? if not, the
channel goes on in a new epoch, ``DIVERGE``; ``inbound.py``) and read from where this
instance was, so its members get what was published meanwhile (live messages wait for
it), and nothing twice.

A session starts by finding the primaries (``topology.py``: one server, the primary that
Sentinel names, or a Cluster's) and opens three connections to each, a shard of the
session: the subscriber (SUBSCRIBE, or SSUBSCRIBE on a Cluster, and a PING every
``PING_INTERVAL`` that Redis must answer within ``PING_TIMEOUT``), the publisher
(pipelined batches, answered within ``PUBLISH_TIMEOUT``) and the reader (history reads;
idle, it checks the node is still a primary). Every wait on Redis has a deadline, because
a hung Redis (stopped, swapping, partitioned) answers nothing and closes nothing: without
deadlines it would look healthy forever. Any failure of any connection, an answer saying
the node no longer takes our writes (READONLY, MOVED...), or the topology announcing a new
primary, ends the session: every connection is dropped, the state (``unreachable``:
refused, reset, authentication; ``unresponsive``: a deadline passed; ``failing over``)
shows in ``degraded()`` and is logged once, and the broker reconnects with backoff,
silently until the state changes, then resubscribes.

Publishing never blocks the relay: messages wait in their shard's outbox for its
publisher task. While Redis is healthy and the outboxes hold more than ``HIGH_WATER``
bytes, ``writable()`` is False and the relay stops reading its publishers until they are
back under ``LOW_WATER``, so a fast publisher is paced to what Redis takes instead of
losing messages. While Redis is degraded nothing is paced (local relay goes on at full
speed) and messages for other instances are dropped and counted.
"""

import asyncio
import contextlib
import itertools
import math
import os
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsechod.brokers.base import Deliver, Members, PresenceUnavailable, Snapshot
from wsechod.brokers.format import (
    APPEND_SHA,
    BINARY,
    CHAIN,
    CONTROL,
    ID_SIZE,
    MAGIC,
    MESSAGE_ID_MASK,
    MESSAGE_ID_SIZE,
    META_TTL,
    ORIGIN_SIZE,
    READ_SHA,
    SCRIPTS,
    TEXT,
    UNNUMBERED,
    channel_key,
    history_keys,
    went_on,
)
from wsechod.brokers.inbound import OVERHEAD, Inbound
from wsechod.brokers.presence import RedisPresence, Unavailable
from wsechod.brokers.topology import Node, NotLocated, Single, Topology, connect
from wsechod.history import History, Position, Recovery, Stored, continued, new_epoch
from wsechod.log import get_logger
from wsechod.ratelimit import RateLimitedLog

log = get_logger("wsechod.broker")

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
BATCH_BYTES = 256 * 2**10  # one pipelined round trip carries at most this...
BATCH_MESSAGES = 1024  # ...and this many messages

CONNECTING, CONNECTED, FAILING_OVER = "connecting", "connected", "failing over"
UNREACHABLE, UNRESPONSIVE, CLOSED = "unreachable", "unresponsive", "closed"

# Answers that say this node no longer takes our writes (demoted, failing over, slots
# moved, scripts flushed): the session ends and the next one finds where Redis is now.
MOVED_ON = (
    ReadOnlyError, BusyLoadingError, MovedError, AskError, TryAgainError, ClusterDownError,
    MasterDownError, NoScriptError,
)  # fmt: skip
MOVED_WORDS = ("READONLY", "MASTERDOWN", "CLUSTERDOWN", "MOVED", "NOSCRIPT")


# What the outbox holds: a command, its size, and the future of a message with history.
Queued = tuple[tuple[Any, ...], int, "asyncio.Future[Position | None] | None"]
Read = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


def _answered(
    future: "asyncio.Future[Position | None] | None", value: Position | None
) -> "asyncio.Future[Position | None] | None":
    if future is not None and not future.done():
        future.set_result(value)
    return future


def _moved(exc: ResponseError) -> str | None:
    """Why this answer says the node no longer takes our writes, or None. (A primary that
    refuses writes for want of replicas, NOREPLICAS, is still the primary: the message
    is refused, counted, and the session goes on.)"""
    if isinstance(exc, MOVED_ON) or any(word in str(exc) for word in MOVED_WORDS):
        return f"{type(exc).__name__}: {exc}"
    return None


class _Down(Exception):
    """The session with Redis is over: the state it leaves the broker in, and why."""

    def __init__(self, state: str, error: str, kind: str) -> None:
        super().__init__(error)
        self.state, self.error, self.kind = state, error, kind


class _Shard:
    """One primary's part of a session: what waits for its publisher and its reader, and
    its subscriber's pings. One server and Sentinel have one; a Cluster one per primary."""

    def __init__(self, node: Node, run_id: str) -> None:
        self.node = node
        self.run_id = run_id  # the primary's server process ('': unknown)
        self.outbox: deque[Queued] = deque()
        self.mail = asyncio.Event()  # the outbox is not empty
        self.changed = asyncio.Event()  # channels here changed
        self.reads: asyncio.Queue[Read] = asyncio.Queue()
        self.pong = asyncio.Event()
        self.ping_seq = self.ponged = 0
        self.unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent, not yet answered
        self.over = False  # its session has ended: no more reads are taken


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        topology: Topology | None = None,
        presence_interval: float = 10.0,
    ) -> None:
        self.url = url
        self.topology = topology or Single(url)
        self.shown = self.topology.describe()  # the only form of the URL that reaches a log
        password = urllib.parse.urlsplit(url).password
        self._secret = urllib.parse.unquote(password) if password else None
        self.id = os.urandom(ID_SIZE)
        self._message_ids = itertools.count(int.from_bytes(os.urandom(MESSAGE_ID_SIZE), "big"))
        self.presence = RedisPresence(self.topology, self.id.hex(), presence_interval)
        self.channels: set[str] = set()
        self.state = CONNECTING
        self.counts = dict.fromkeys(
            (
                "published", "delivered", "lost", "unconfirmed", "failed", "malformed",
                "reconnects", "switches",
            ),
            0,
        )  # fmt: skip
        self._warn = RateLimitedLog(log)
        self._task: asyncio.Task[None] | None = None
        self._outcome: asyncio.Future[None] | None = None  # the first attempt's
        self._shards: list[_Shard] = []  # the session's, while it is up
        self._by_slot: list[_Shard] = []  # a Cluster's: the shard of each hash slot
        self._primaries: list[str] = []  # the addresses of the last session's primaries
        self.inbound = Inbound(
            self.id, self.counts, self._warn,
            subscribed=self.channels.__contains__, read=self._read_now, recover=self.recover,
            run_id=self._run_id_of,
        )  # fmt: skip
        self._queued = 0  # bytes in the outboxes and in flight
        self._paused = False  # above HIGH_WATER, not yet back under LOW_WATER
        self._waiters: list[Callable[[], None]] = []
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
        self.inbound.deliver = deliver
        self._outcome = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="redis broker")
        self.presence.start(snapshot)
        await asyncio.wait([self._outcome], timeout=3 * CONNECT_TIMEOUT + PING_TIMEOUT + 1)

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self._changed(channel)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self.inbound.left(channel)
        self._changed(channel)

    def _changed(self, channel: str) -> None:
        if (shard := self._shard_of(channel)) is not None:
            shard.changed.set()

    def _shard_of(self, channel: str) -> _Shard | None:
        """The shard a channel lives on (None: no session)."""
        if self._by_slot:
            return self._by_slot[key_slot(channel_key(channel).encode())]
        return self._shards[0] if self._shards else None

    def _run_id_of(self, channel: str) -> str:
        """The run id of the primary a channel lives on ('': unknown)."""
        shard = self._shard_of(channel)
        return shard.run_id if shard is not None else ""

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
        shard = self._shard_of(channel) if self.state == CONNECTED else None
        if shard is None:
            self.counts["lost"] += 1
            if self.state != CLOSED:
                lost = self.counts["lost"]
                self._warn.warning(f"broker {self.state}: message not sent", lost=lost)
            return _answered(stored, None)
        kind = TEXT if text else BINARY
        number = next(self._message_ids) & MESSAGE_ID_MASK
        message_id = number.to_bytes(MESSAGE_ID_SIZE, "big")
        head = b"".join((MAGIC, self.id, kind, origin.to_bytes(ORIGIN_SIZE, "big"), message_id))
        name = channel_key(channel)
        sharded = self.topology.sharded
        command: tuple[Any, ...]
        if history is None:
            command = ("SPUBLISH" if sharded else "PUBLISH", name, head + UNNUMBERED + payload)
        else:
            ttl = max(1, math.ceil(history.ttl))
            command = (
                "EVALSHA", APPEND_SHA, 2, *history_keys(channel), name, kind + payload,
                history.size, ttl, max(ttl, META_TTL), new_epoch(), head,
                "SPUBLISH" if sharded else "PUBLISH", message_id, shard.run_id, CHAIN,
            )  # fmt: skip
        size = len(payload) + 2 * len(name) + len(head) + OVERHEAD
        if self._queued + size > OUTBOX_LIMIT:
            self.counts["lost"] += 1
            lost = self.counts["lost"]
            self._warn.warning("broker outbox full: message dropped", limit=OUTBOX_LIMIT, lost=lost)
            return _answered(stored, None)
        shard.outbox.append((command, size, stored))
        if history is not None and origin:
            self.inbound.published(number, origin)
        self._queued += size
        if self._queued > HIGH_WATER:
            self._paused = True
        shard.mail.set()
        return stored

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        """Read by the session's reader (ConnectionError while there is none)."""
        after = "" if since is None else str(since.offset)
        command = (
            "EVALSHA", READ_SHA, 2, *history_keys(channel), new_epoch(), META_TTL, after, limit,
        )  # fmt: skip
        epoch, top, found, replaced = await self._read_now(channel, command)
        entries = []
        for entry_id, fields in found:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            data, message_id = values[b"d"], int.from_bytes(values.get(b"i", b""), "big")
            offset = int(entry_id.split(b"-")[0])
            entries.append(Stored(offset, data[1:], data[:1] == TEXT, message_id))
        now = Position(int(top), epoch.decode())
        if since is not None and since.epoch != now.epoch and went_on(replaced, since):
            since = Position(since.offset, now.epoch)  # the same messages, in its new epoch
        return continued(since, now, entries)

    async def _read_now(self, channel: str, command: tuple[Any, ...]) -> Any:
        shard = self._shard_of(channel) if self.state == CONNECTED else None
        if shard is None or shard.over:
            raise ConnectionError(f"broker {self.state}")
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        shard.reads.put_nowait((command, answer))
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
        reconnects: sessions after the first; switches: sessions with other primaries."""
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
        """Find the primaries, connect to each, then read, ping and publish until
        something fails or the primaries change (raises ``_Down``)."""
        conns: list[AbstractConnection] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                nodes = await self.topology.locate()
            except NotLocated as exc:
                raise _Down(UNREACHABLE, self._scrub(str(exc)), "locate") from None
            shards: list[tuple[_Shard, list[AbstractConnection]]] = []
            for node in nodes:
                opened: list[AbstractConnection] = []
                for _ in range(3):
                    opened.append(await self._open(node))
                    conns.append(opened[-1])
                shards.append((_Shard(node, await self._prepare(opened[2])), opened))
            self.inbound.session_started()
            self._shards = [shard for shard, _ in shards]
            self._by_slot = self._slot_table() if self.topology.sharded else []
            for shard, (subscriber, publisher, reader) in shards:
                tasks += [
                    asyncio.create_task(self._read(shard, subscriber)),
                    asyncio.create_task(
                        self._keepalive(shard, subscriber, first=shard is self._shards[0])
                    ),
                    asyncio.create_task(self._send(shard, publisher)),
                    asyncio.create_task(self._serve_reads(shard, reader)),
                ]
            tasks.append(asyncio.create_task(self._watch()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise _Down(UNREACHABLE, "session ended", "bug")  # the tasks never return
        finally:
            self._end_reads()
            self.inbound.session_ended()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in tasks:  # a second failure is a consequence of the first: no report
                if task.done() and not task.cancelled():
                    task.exception()
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    def _slot_table(self) -> list[_Shard]:
        table: list[_Shard | None] = [None] * 16_384
        for shard in self._shards:
            for first, last in shard.node.slots:
                table[first : last + 1] = [shard] * (last - first + 1)
        assert all(table), "locate() returns a full layout"
        return [shard for shard in table if shard is not None]

    async def _open(self, node: Node) -> AbstractConnection:
        """A connection to ``node`` that has answered a PING, within CONNECT_TIMEOUT. No
        retries inside redis-py: a retried PUBLISH can be delivered twice."""
        try:
            return await connect(node.url)
        except (ValueError, TypeError) as exc:
            raise _Down(UNREACHABLE, self._scrub(f"invalid broker URL: {exc}"), "url") from None
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failure(exc, CONNECT_TIMEOUT) from None

    async def _prepare(self, conn: AbstractConnection) -> str:
        """That the node is one to write to (a primary), and the scripts, by their SHA-1
        from then on (a restarted Redis has none). Returns its run id, which is another
        after a failover (another server) or a restart (``APPEND``: a new epoch); '' if
        INFO is refused (an ACL), and history then relies on what each instance
        remembers (``LOOK``)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.topology.check(conn)
                for script in SCRIPTS:
                    await conn.send_command("SCRIPT", "LOAD", script, check_health=False)
                    await conn.read_response()
                await conn.send_command("INFO", "server", check_health=False)
                try:
                    info = await conn.read_response()
                except ResponseError as exc:
                    self._warn.warning("redis refused INFO: history relies on LOOK", error=str(exc))
                    return ""
        except NotLocated as exc:
            raise _Down(UNREACHABLE, str(exc), "role") from None
        except TimeoutError:
            raise _Down(UNRESPONSIVE, "no answer to SCRIPT LOAD or INFO", "timeout") from None
        except (RedisError, OSError) as exc:
            raise self._failure(exc, CONNECT_TIMEOUT) from None
        found = re.search(rb"^run_id:(\w+)", info if isinstance(info, bytes) else b"", re.M)
        return found[1].decode() if found else ""

    async def _watch(self) -> None:
        """End the session when the topology says the primaries changed."""
        why = await self.topology.watch()
        raise _Down(FAILING_OVER, why, "switch")

    async def _serve_reads(self, shard: _Shard, conn: AbstractConnection) -> None:
        """History reads, one at a time, each answered within PUBLISH_TIMEOUT; and every
        PING_INTERVAL, reads or not, the topology's check that the node is still a
        primary (a Cluster demotes one at once and leaves its connections open)."""
        loop = asyncio.get_running_loop()
        check_at = loop.time() + PING_INTERVAL
        while True:
            if loop.time() >= check_at:
                await self._check(conn)
                check_at = loop.time() + PING_INTERVAL
            try:
                async with asyncio.timeout(max(0.0, check_at - loop.time())):
                    command, answer = await shard.reads.get()
            except TimeoutError:
                continue
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
                answer.set_exception(ConnectionError(f"history read refused: {exc}"))
                if (why := _moved(exc)) is not None:
                    raise _Down(FAILING_OVER, f"history read: {why}", "moved") from None
                self._warn.warning("broker refused a history read", error=str(exc))
                continue
            except (RedisError, OSError) as exc:
                answer.set_exception(ConnectionError(f"history read failed: {exc}"))
                raise self._failure(exc, PUBLISH_TIMEOUT) from None
            if not answer.done():
                answer.set_result(reply)

    async def _check(self, conn: AbstractConnection) -> None:
        try:
            await self.topology.check(conn)
        except NotLocated as exc:
            raise _Down(FAILING_OVER, str(exc), "role") from None
        except TimeoutError:
            raise _Down(UNRESPONSIVE, "no answer to a check", "timeout") from None
        except (RedisError, OSError) as exc:
            raise self._failure(exc, PUBLISH_TIMEOUT) from None

    def _end_reads(self) -> None:
        """Reads still waiting fail: the session is over."""
        for shard in self._shards:
            shard.over = True
            while not shard.reads.empty():
                _, answer = shard.reads.get_nowait()
                if not answer.done():
                    answer.set_exception(ConnectionError("broker session ended"))

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

    async def _read(self, shard: _Shard, conn: AbstractConnection) -> None:
        """The subscriber's replies: messages, and the answers to our pings. No deadline
        here: the pings are what notices a Redis that has gone quiet."""
        while True:
            try:
                reply = await conn.read_response()
            except (RedisError, OSError) as exc:
                raise self._failure(exc, PING_TIMEOUT) from None
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            kind = reply[0]
            if kind in (b"message", b"smessage") and len(reply) == 3:
                self.inbound.received(reply[1], reply[2])
            elif kind == b"pong":
                with contextlib.suppress(ValueError):
                    shard.ponged = max(shard.ponged, int(reply[1]))
                    shard.pong.set()
            elif kind == b"sunsubscribe":
                name = reply[1]
                if shard.unsubscribing.get(name, 0) > 0:
                    shard.unsubscribing[name] -= 1
                    if not shard.unsubscribing[name]:
                        del shard.unsubscribing[name]
                else:  # Redis's own: the channel's slot has moved to another shard
                    raise _Down(FAILING_OVER, f"slot of {name.decode()} moved", "moved")

    async def _keepalive(self, shard: _Shard, conn: AbstractConnection, *, first: bool) -> None:
        """Follow local joins and leaves, and ping; each round ends with a PING, whose
        answer also confirms the (un)subscriptions sent before it. The ``first`` shard's
        round says when the session is up."""
        loop = asyncio.get_running_loop()
        subscribed: set[str] | None = None  # None: not even CONTROL yet
        while True:
            began = loop.time()
            shard.changed.clear()
            wanted = {c for c in self.channels if self._shard_of(c) is shard}
            commands: list[tuple[Any, ...]] = []
            if subscribed is None:
                commands.append(("SUBSCRIBE", CONTROL))
            added = sorted(wanted - (subscribed or set()))
            removed = sorted((subscribed or set()) - wanted)
            if self.topology.sharded:  # one slot per SSUBSCRIBE: one channel each
                commands += [("SSUBSCRIBE", channel_key(c)) for c in added]
                for c in removed:
                    commands.append(("SUNSUBSCRIBE", key := channel_key(c)))
                    shard.unsubscribing[key.encode()] = shard.unsubscribing.get(key.encode(), 0) + 1
            else:
                if added:
                    commands.append(("SUBSCRIBE", *(channel_key(c) for c in added)))
                if removed:
                    commands.append(("UNSUBSCRIBE", *(channel_key(c) for c in removed)))
            shard.ping_seq += 1
            commands.append(("PING", str(shard.ping_seq)))
            await self._round_trip(shard, conn, commands)
            if subscribed is None and first:
                self._up()
            if wanted != subscribed:
                log.debug("broker subscriptions", node=shard.node.address, channels=sorted(wanted))
            subscribed = wanted
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, began + PING_INTERVAL - loop.time())):
                    await shard.changed.wait()

    async def _round_trip(
        self, shard: _Shard, conn: AbstractConnection, commands: list[tuple[Any, ...]]
    ) -> None:
        seq = shard.ping_seq
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                while shard.ponged < seq:
                    shard.pong.clear()
                    await shard.pong.wait()
        except TimeoutError:
            await asyncio.sleep(GRACE)  # the answer may be waiting behind a stalled loop
            if shard.ponged < seq:
                raise _Down(
                    UNRESPONSIVE, f"no answer to PING within {PING_TIMEOUT:g} s", "timeout"
                ) from None
        except (RedisError, OSError) as exc:
            raise self._failure(exc, PING_TIMEOUT) from None

    async def _send(self, shard: _Shard, conn: AbstractConnection) -> None:
        """Publish the outbox in pipelined batches, in order, each within PUBLISH_TIMEOUT."""
        outbox = shard.outbox
        while True:
            while not outbox:
                shard.mail.clear()
                try:
                    async with asyncio.timeout(PING_INTERVAL):
                        await shard.mail.wait()
                except TimeoutError:
                    await self._idle_ping(conn)
            batch: list[Queued] = []
            size = 0
            while outbox and len(batch) < BATCH_MESSAGES and size < BATCH_BYTES:
                batch.append(outbox.popleft())
                size += batch[-1][1]
            answered = 0
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    packed = conn.pack_commands([command for command, _, _ in batch])
                    await conn.send_packed_command(packed, check_health=False)
                    for _, _, stored in batch:
                        await self._answer(conn, stored)
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

    async def _answer(
        self, conn: AbstractConnection, stored: "asyncio.Future[Position | None] | None"
    ) -> None:
        """Read the answer to one message. An error answer: this node no longer takes it
        (the session ends), or it is refused (e.g. an ACL without PUBLISH rights: counted,
        the rest goes on)."""
        try:
            reply = await conn.read_response()
        except ResponseError as exc:
            if (why := _moved(exc)) is not None:
                raise _Down(FAILING_OVER, self._scrub(why), "moved") from None
            self.counts["failed"] += 1
            self._warn.warning("broker refused a message", error=str(exc))
            _answered(stored, None)
            return
        self.counts["published"] += 1
        if stored is not None:
            _answered(stored, Position(int(reply[0]), reply[1].decode()))

    async def _idle_ping(self, conn: AbstractConnection) -> None:
        """An idle publisher connection is pinged too: Redis's ``timeout`` would close it,
        and the next message would be lost finding out."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await conn.send_command("PING", check_health=False)
                await conn.read_response()
        except (RedisError, OSError) as exc:
            raise self._failure(exc, PUBLISH_TIMEOUT) from None

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
        primaries = [shard.node.address for shard in self._shards]
        fields["primaries"] = ",".join(primaries)
        if self._primaries and primaries != self._primaries:
            fields["was"] = ",".join(self._primaries)
            self.counts["switches"] += 1
            log.warning("broker primary switched", **fields)
        else:
            log.info("broker connected", **fields)
        self._primaries = primaries
        self.inbound.session_up()
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
        """Drop the session's shards and empty their outboxes (Redis is gone), counting
        their messages as lost."""
        shards, self._shards, self._by_slot = self._shards, [], []
        discarded = 0
        for shard in shards:
            discarded += len(shard.outbox)
            self._queued -= sum(size for _, size, _ in shard.outbox)
            for _, _, stored in shard.outbox:
                _answered(stored, None)
            shard.outbox.clear()
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
