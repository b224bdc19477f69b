"""Relay: clients on the same path form a channel; what one sends, the others receive.

A message is framed once and the same bytes are written to every member. Flow control,
per channel:

- A receiver whose write buffer goes above ``write_limit`` is *behind*. While a member
  of a channel is behind, the channel's publishers are held: the server stops reading
  them, and the message each had just sent waits with it (so a receiver gets at most one
  message beyond ``write_limit``, and each publisher's order is kept).
- A receiver is *slow* when it stays behind for ``slow_consumer_timeout``, or when it
  keeps holding its channel back longer than its peers: the *lag window*. Each time the
  channel's held publishers are released, every receiver that was behind is charged how
  much longer than twice the median of the other receivers it took to drain (those that
  were not behind count as zero), into a leaky bucket that loses a tenth of real time;
  more than ``slow_consumer_timeout`` in the bucket is slow. Readers that keep up with
  each other are never charged, even at the channel's full speed; in a
  stream with one publisher and one reader the reader's pace is the stream's; one that
  drains just fast enough to stay under the first rule is caught by the second.
- A slow receiver no longer holds anyone: with ``slow_consumer = "drop"`` it gets what
  fits under ``write_limit`` and the rest is dropped (counted), until its bucket has
  leaked down to half the limit; with ``"close"`` it is closed with 1008. Messages from
  other instances (the broker) are never held; a receiver they push past
  ``write_limit + max_size`` is slow at once.

So a receiver that stops reading costs at most ``write_limit + max_size`` of memory for
what is written to it and holds its channel for at most ``slow_consumer_timeout``; a slow
reader never paces the channel for the others for long.

History (``history_size``, ``history_ttl``, per channel): the broker numbers and keeps
each message of such a channel and hands it back (``deliver``) to every instance, this
one included, so that every member sees the offsets in order. Members that negotiated
``wsechod.v1`` get envelopes (``wsechod.history``); one that joins or resumes first
*catches up*: what history holds after its position is sent, as fast as it reads, while
live messages wait for it (bounded: past ``write_limit + max_size`` they are let go and
read from history again), then the live stream, with neither gap nor duplicate.
"""

import asyncio
import http
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from wsechod import channels, history, ratelimit
from wsechod.apps import peer
from wsechod.brokers.base import Broker, Members
from wsechod.channels import Policies, Policy, Rule
from wsechod.engine import (
    Admitted,
    Connection,
    Family,
    Figures,
    Prepared,
    Reply,
    Request,
    prepare,
)
from wsechod.engine.frames import CloseCode
from wsechod.history import NOWHERE, History, Position, Published
from wsechod.log import get_logger

log = get_logger("wsechod.relay")
warn = ratelimit.logger("wsechod.relay")


SLOW_REASON = "slow consumer"
READ_ONLY_REASON = "read-only member: no right to publish on this channel"
BROKER_OUTCOMES = ("published", "delivered", "lost", "unconfirmed", "failed", "malformed")
FAMILIES = (
    Family("relay_channels", "gauge", "relay channels now"),
    Family("relay_members", "gauge", "clients on relay channels now"),
    Family(
        "relay_dropped_messages",
        "counter",
        "messages not sent to slow consumers (slow_consumer = drop)",
    ),
    Family(
        "relay_slow_consumers",
        "counter",
        "receivers found slow, by what was done: drop (their messages) or close (1008)",
        labels=("action",),
    ),
    Family(
        "relay_remote_messages",
        "counter",
        "messages from other instances (the broker) relayed to local members",
    ),
    Family("relay_api_messages", "counter", "messages published through the HTTP API here"),
    Family(
        "relay_history_bytes",
        "gauge",
        "bytes of channel history kept in this process (memory broker; within history_memory)",
    ),
    Family(
        "broker_connected",
        "gauge",
        "1 while the broker relays between instances, 0 while degraded (see /healthz)",
        merge="min",
    ),
    Family(
        "broker_messages",
        "counter",
        "messages between instances by outcome: published (answered by Redis), delivered "
        "(from other instances), lost (never sent), unconfirmed (sent, not answered), "
        "failed (refused by Redis), malformed (not wsechod's), too_big (over max_size)",
        labels=("outcome",),
    ),
    Family("broker_reconnects", "counter", "sessions with the broker after the first"),
    Family("broker_failovers", "counter", "sessions with other Redis primaries than the last"),
)
LEAK = 0.1  # share of the time a receiver may alone hold its channel back, indefinitely
POLICIES = ("drop", "close")
CHUNK = 256  # messages asked of history at a time, while a member catches up
API_TIMEOUT = 5.0  # seconds the HTTP API waits for its message to come back numbered


def history_of(policy: Policy) -> History | None:
    """The history a channel keeps, if any."""
    if policy.history_size and policy.history_ttl:
        return History(policy.history_size, policy.history_ttl)
    return None


def channel_of(path: str) -> str:
    """The channel is the request path, normalised (``wsechod.channels``), without the
    query string; admission has refused the paths that name none."""
    return channels.normalize(path)


class Member:
    """A connection's place in its channel."""

    __slots__ = (
        "backlog",
        "backlog_bytes",
        "behind_since",
        "catching_up",
        "channel",
        "conn",
        "debt",
        "debt_at",
        "paced",
        "parts",
        "pending",
        "read_only",
        "room",
        "serial",
        "session",
        "slow",
        "text",
        "timer",
        "tokens",
        "tokens_at",
        "v1",
    )

    def __init__(self, conn: Connection, channel: "Channel", serial: int) -> None:
        self.conn = conn
        self.channel = channel
        self.serial = serial  # its messages' origin, when history hands them back
        self.v1 = conn.subprotocol == history.V1  # envelopes
        # Catching up (v1, history): its task, the live messages waiting for it (None:
        # let go, read from history again) and their size; ``room``: set when it drains.
        self.catching_up: asyncio.Task[None] | None = None
        self.backlog: list[tuple[Position, Prepared]] | None = None
        self.backlog_bytes = 0
        self.room: asyncio.Event | None = None
        self.parts: bytearray | None = None  # a fragmented message being reassembled
        self.text = False
        self.pending: tuple[bytes, bool] | None = None  # held with its publisher
        self.slow = False
        identity = conn.identity
        self.read_only = (identity is not None and not identity.may_publish) or (
            channel.policy.publish == "api"  # only the HTTP API publishes there
        )
        self.tokens = 0.0  # publish_rate's bucket: messages it may still send at once
        self.tokens_at = 0.0
        self.paced = False  # over publish_rate: not read until its bucket has one again
        self.behind_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.debt = 0.0  # seconds it alone held the channel, leaking at LEAK per second
        self.debt_at = 0.0
        self.session: peer.Session | None = None  # its test peer controls (``controls``)


class Channel:
    __slots__ = (
        "behind",
        "broker_wait",
        "episode",
        "fanning",
        "history",
        "members",
        "name",
        "policy",
        "waiting",
    )

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.policy = policy  # its [[channel]] table's, or the global settings
        self.history = history_of(policy)
        self.members: dict[Connection, Member] = {}
        self.behind: set[Member] = set()  # receivers above write_limit, not slow
        self.waiting: deque[Member] = deque()  # publishers held, each with one message
        self.episode: dict[Member, float] = {}  # since someone fell behind: drain times
        self.broker_wait = False  # a release is registered with the broker
        self.fanning = False  # inside a fan-out: a release waits for the next loop pass


class Relay:
    """The relay application and its channel hub."""

    def __init__(self, broker: Broker, **options: Any) -> None:
        self.broker = broker
        self.policies = Policies((), Policy(False, "drop", 2.0, 1_000, "members", 0, 0.0))
        self.max_size = 0  # what a client may send: what another instance may, too
        self.cap = 0  # a receiver's buffer never grows past this
        self.max_channels = self.max_path_length = 0
        self.publish_rate = 0.0
        self.controls = False
        self.channels: dict[str, Channel] = {}
        self._serials = itertools.count(1)
        self._api_waiting: dict[int, asyncio.Future[int]] = {}  # origin: members reached
        self.configure(**options)
        self.stats = {
            "dropped": 0,
            "slow_dropping": 0,
            "slow_closed": 0,
            "remote": 0,
            "remote_too_big": 0,
            "api": 0,
        }
        self._now: Callable[[], float] = asyncio.get_running_loop().time

    def configure(
        self,
        *,
        echo: bool = False,
        write_limit: int = 2**15,
        max_size: int = 2**20,
        max_channels: int = 10_000,
        max_channel_members: int = 1_000,
        max_path_length: int = 256,
        slow_consumer: str = "drop",
        slow_consumer_timeout: float = 2.0,
        publish_rate: float = 0.0,
        history_size: int = 0,
        history_ttl: float = 0.0,
        channel_rules: tuple[Rule, ...] = (),
        controls: bool = False,
    ) -> None:
        """At start, and on a reload: the limits and the policies apply from now on, to
        the channels open already too (publish rights: to members that join from now)."""
        default = Policy(
            echo,
            slow_consumer,
            slow_consumer_timeout,
            max_channel_members,
            "members",
            history_size,
            history_ttl,
        )
        self.policies = Policies(channel_rules, default)
        self.max_size = max_size
        self.cap = write_limit + max_size
        self.max_channels = max_channels
        self.max_path_length = max_path_length
        self.publish_rate = publish_rate
        self.controls = controls
        for channel in self.channels.values():
            channel.policy = self.policies.of(channel.name)
            channel.history = history_of(channel.policy)

    # --- admission -------------------------------------------------------------------

    def admit(self, request: Request) -> Reply | Admitted | None:
        """Refuse, before the handshake, a channel name or a member over the limits; with
        ``controls``, the test peer's that act on any connection."""
        written = request.route
        if len(written) > self.max_path_length:
            status, text = http.HTTPStatus.REQUEST_URI_TOO_LONG, "channel name too long\n"
            return Reply(status, text, refused="max_path_length")
        try:
            name = channels.name_of(written)
        except channels.InvalidName as exc:
            text = f"invalid channel name: {exc}\n"
            return Reply(http.HTTPStatus.BAD_REQUEST, text, refused="invalid_channel")
        channel = self.channels.get(name)
        if channel is None and len(self.channels) >= self.max_channels:
            warn.warning("connection refused", reason="max_channels", limit=self.max_channels)
            text = "too many channels\n"
            return Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, text, refused="max_channels")
        limit = (self.policies.of(name) if channel is None else channel.policy).max_channel_members
        if channel is not None and len(channel.members) >= limit:
            warn.warning("connection refused", reason="max_channel_members", limit=limit)
            text = "channel is full\n"
            return Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, text, refused="max_channel_members")
        return peer.admit(request, self.max_size, echo=False) if self.controls else None

    def degraded(self) -> str | None:
        return self.broker.degraded()

    def families(self) -> tuple[Family, ...]:
        return FAMILIES

    def figures(self) -> Figures:
        stats, broker = self.stats, self.broker.stats()
        connected = int(self.broker.degraded() is None)
        gauges: dict[str, float] = {
            "relay_channels": len(self.channels),
            "relay_members": sum(len(c.members) for c in self.channels.values()),
            "broker_connected": connected,
            "relay_history_bytes": broker.get("history_bytes", 0),
        }
        counters = {
            "relay_dropped_messages": stats["dropped"],
            "relay_slow_consumers/drop": stats["slow_dropping"],
            "relay_slow_consumers/close": stats["slow_closed"],
            "relay_remote_messages": stats["remote"],
            "relay_api_messages": stats["api"],
            "broker_messages/too_big": stats["remote_too_big"],
            "broker_reconnects": broker.get("reconnects", 0),
            "broker_failovers": broker.get("switches", 0),
        }
        for outcome in BROKER_OUTCOMES:
            counters[f"broker_messages/{outcome}"] = broker.get(outcome, 0)
        return Figures(gauges, counters)

    # --- membership ------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        name = channel_of(conn.path)
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(name, self.policies.of(name))
            self.broker.subscribe(name)
        member = Member(conn, channel, next(self._serials))
        member.session = conn.app_data  # admission's: the controls, if any
        channel.members[conn] = member
        conn.app_data = member
        self.broker.presence_changed()
        if member.session is not None:  # its greeting (headers) before anything else
            peer.start(conn, member.session)
        if member.v1:
            since = history.resume_of(conn.path)  # admission has checked it
            if channel.history is None:  # nothing kept: nothing to catch up with
                kind = history.POSITION if since is None else history.LOST
                conn.send(history.head(kind, NOWHERE), text=True)
            else:
                member.backlog = []
                member.catching_up = asyncio.create_task(self._catch_up(member, since))
        if member.session is not None and peer.ends_after(member.session) == 0:
            peer.end(conn, member.session)

    def closed(self, conn: Connection) -> None:
        member: Member = conn.app_data
        channel = member.channel
        channel.members.pop(conn, None)
        self.broker.presence_changed()
        if member.catching_up is not None:
            member.catching_up.cancel()
            member.backlog = None
        if member.timer is not None:
            member.timer.cancel()
        if member.session is not None:
            peer.stop(member.session)
        if member.slow and conn.dropped:
            warn.info("slow consumer left", peer=conn.peer, dropped=conn.dropped)
        if member in channel.behind:
            self._not_behind(member, settle=False)
        # A publisher held with its message: the message was received whole, so it still
        # goes out when the channel moves (``_release`` skips resuming the gone client).
        # (Leaving while behind may have released, and so forgotten, the channel already.)
        self._forget_if_empty(channel)

    # --- messages --------------------------------------------------------------------

    def data(self, conn: Connection, payload: bytes, text: bool, first: bool, last: bool) -> None:
        member: Member = conn.app_data
        if member.read_only:  # its token grants no publish right on this channel
            conn.close(CloseCode.POLICY_VIOLATION, READ_ONLY_REASON)
            return
        if not last:  # put together (the engine bounds it by max_size), and counted
            if first:
                member.parts, member.text = bytearray(payload), text
            elif member.parts is not None:
                member.parts += payload
            conn.hold(len(payload))
            return
        if not first and member.parts is not None:
            member.parts += payload
            payload, text, member.parts = bytes(member.parts), member.text, None
            conn.hold(-conn.app_held)  # the parts are let go of...
        if self.publish_rate:
            self._pace(member)
        channel = member.channel
        if channel.behind or channel.waiting or not self.broker.writable():
            member.pending = (payload, text)
            conn.hold(len(payload))  # ...and a message held with its publisher counted
            conn.pause_reading()
            channel.waiting.append(member)
            self._wait_for_broker(channel)
            return  # counted once it is published (``_release``)
        self._publish(channel, payload, text, member)
        if member.session is not None:  # after this message, the controls' ending
            peer.count(conn, member.session)

    def _publish(self, channel: Channel, payload: bytes, text: bool, sender: Member) -> None:
        """A member's message: to the others here at once and through the broker to every
        other instance; with history, numbered by the broker first, which hands it back
        (``deliver``) to be sent here in offset order."""
        if channel.history is not None:
            self.broker.publish(
                channel.name, payload, text, history=channel.history, origin=sender.serial
            )
            return
        skip = 0 if channel.policy.relay_echo else sender.serial
        self._fan_out(channel, prepare(payload, text), NOWHERE, skip)
        self.broker.publish(channel.name, payload, text)

    def deliver(
        self, name: str, payload: bytes, text: bool, at: Position | None, origin: int
    ) -> bool:
        """A message from the broker: from another instance (``origin`` 0), or one of
        ours with history (numbered: ``at``). To every member here, never held (the
        broker serves every channel); a receiver it pushes past the cap is slow at once.
        Whether it was delivered (not: no member here any more, or too big)."""
        waiting = self._api_waiting.pop(origin, None) if origin else None
        channel = self.channels.get(name)
        if channel is None:
            if waiting is not None and not waiting.done():
                waiting.set_result(0)
            return False
        if len(payload) > self.max_size:  # bounded like what a client sends
            self.stats["remote_too_big"] += 1
            warn.warning(
                "message from another instance over max_size dropped",
                reason="max_size",
                channel=name,
                size=len(payload),
            )
            return False
        if not origin:
            self.stats["remote"] += 1
        skip = 0 if channel.policy.relay_echo else origin
        sent = self._fan_out(channel, prepare(payload, text), at or NOWHERE, skip)
        if waiting is not None and not waiting.done():
            waiting.set_result(sent)
        return True

    # --- presence (the HTTP API's GET /channels) --------------------------------------

    def presence(self) -> dict[str, Members]:
        """The members here, by channel: their number and the connections of each sub
        (what the broker writes for the other instances)."""
        out: dict[str, Members] = {}
        for name, channel in self.channels.items():
            if not channel.members:
                continue
            subs: dict[str, int] = {}
            for conn in channel.members:
                identity = conn.identity
                if identity is not None and identity.sub:
                    subs[identity.sub] = subs.get(identity.sub, 0) + 1
            out[name] = (len(channel.members), subs)
        return out

    async def channel_counts(self) -> dict[str, int]:
        return await self.broker.channel_counts()

    async def channel_members(self, name: str) -> Members:
        return await self.broker.channel_members(name)

    # --- the HTTP API's POST /publish --------------------------------------------------

    async def publish(self, name: str, payload: bytes, text: bool) -> Published:
        """A message from the HTTP API: to every member here, never held (as a message
        from another instance is), and through the broker to every other instance; with
        history, once the broker has numbered it."""
        self.stats["api"] += 1
        channel = self.channels.get(name)
        kept = history_of(channel.policy if channel else self.policies.of(name))
        if kept is None:
            message = prepare(payload, text)
            sent = 0 if channel is None else self._fan_out(channel, message, NOWHERE, 0)
            self.broker.publish(name, payload, text)
            return Published(sent, None)
        origin = next(self._serials)
        reached = asyncio.get_running_loop().create_future()
        if channel is not None:  # else nobody here: the broker hands nothing back
            self._api_waiting[origin] = reached
        try:
            stored = self.broker.publish(name, payload, text, history=kept, origin=origin)
            async with asyncio.timeout(API_TIMEOUT):
                at = None if stored is None else await stored
                sent = await reached if channel is not None and at is not None else 0
        finally:
            self._api_waiting.pop(origin, None)
        if at is None:  # not numbered, so kept and sent nowhere
            raise ConnectionError(self.broker.degraded() or "the broker lost it")
        return Published(sent, at)

    def _fan_out(self, channel: Channel, message: Prepared, at: Position, exclude: int) -> int:
        """Write ``message`` (at ``at``, for envelopes) to every member but the one whose
        serial is ``exclude``; how many it reached (those catching up keep it for later)."""
        channel.fanning = True
        sent = 0
        envelope: Prepared | None = None
        try:
            for member in channel.members.values():
                if member.serial == exclude:
                    continue
                if member.v1:  # one envelope for them all
                    if envelope is None:
                        head = history.head(history.MESSAGE, at)
                        envelope = prepare(head + message.payload, message.text)
                    if member.catching_up is not None:
                        self._keep(member, at, envelope)
                        continue
                conn = member.conn
                if conn.blocked:
                    if not member.slow and conn.buffered + len(message.frame) > self.cap:
                        self._slow(member)  # pushed past the cap by messages nobody held
                    if member.slow:
                        conn.dropped += 1
                        self.stats["dropped"] += 1
                        continue
                elif (
                    member.slow
                    and channel.policy.slow_consumer == "drop"
                    and self._leaked(member) <= channel.policy.slow_consumer_timeout / 2
                ):
                    self._caught_up(member)
                conn.send_prepared(envelope if member.v1 and envelope is not None else message)
                sent += 1
        finally:
            channel.fanning = False
        return sent

    # --- flow control ----------------------------------------------------------------

    def blocked(self, conn: Connection) -> None:
        member: Member | None = conn.app_data
        if member is None or member.slow or not conn.open or member.catching_up is not None:
            return  # one catching up is paced by its own reading (``_room``)
        member.behind_since = self._now()
        member.channel.behind.add(member)
        timeout = member.channel.policy.slow_consumer_timeout
        member.timer = asyncio.get_running_loop().call_later(timeout, self._timeout, member)

    def unblocked(self, conn: Connection) -> None:
        member: Member | None = conn.app_data
        if member is not None and member.room is not None:
            member.room.set()
        if member is not None and member in member.channel.behind:
            member.channel.episode[member] = self._now() - member.behind_since
            self._not_behind(member)

    def _not_behind(self, member: Member, settle: bool = True) -> None:
        channel = member.channel
        channel.behind.discard(member)
        if member.timer is not None:
            member.timer.cancel()
            member.timer = None
        if channel.behind:
            return
        if settle:
            self._settle(channel)
        channel.episode.clear()
        if channel.fanning:  # not inside the loop over the members: the next pass
            asyncio.get_running_loop().call_soon(self._release, channel)
        else:
            self._release(channel)

    def _settle(self, channel: Channel) -> None:
        """Everyone has drained: charge each receiver that was behind how much longer it
        took than the median of the others. Only a hold that kept a message from someone
        is charged (in a one-publisher, one-reader stream the reader's pace is the
        stream's)."""
        waiting = channel.waiting
        if not waiting or not channel.episode:
            return
        policy = channel.policy
        publisher = waiting[0] if len(waiting) == 1 and not policy.relay_echo else None
        receivers = [m for m in channel.members.values() if not m.slow and m is not publisher]
        if len(receivers) < 2:
            return
        durations = sorted(channel.episode.get(m, 0.0) for m in receivers)
        for member, took in list(channel.episode.items()):
            if member.slow or member is publisher or member.conn not in channel.members:
                continue
            others = durations.copy()
            others.remove(took)
            # Twice the median: a receiver that is merely later (farther away, or reading
            # in bigger gulps) than the others is not charged; one at half their speed is.
            excess = took - 2 * others[(len(others) - 1) // 2]
            if excess > 0:
                member.debt = self._leaked(member) + excess
                if member.debt > policy.slow_consumer_timeout:
                    self._slow(member)

    def _leaked(self, member: Member) -> float:
        """The member's debt now that LEAK per second has leaked away since last time."""
        now = self._now()
        member.debt = max(0.0, member.debt - (now - member.debt_at) * LEAK)
        member.debt_at = now
        return member.debt

    def _timeout(self, member: Member) -> None:
        member.timer = None
        if member in member.channel.behind:
            member.debt = max(self._leaked(member), member.channel.policy.slow_consumer_timeout)
            self._slow(member)

    def _slow(self, member: Member) -> None:
        """No longer holds anyone: dropped from until it catches up, or closed."""
        if member.slow or not member.conn.open:
            return
        member.slow = True
        conn, channel = member.conn, member.channel
        if member in channel.behind:
            self._not_behind(member, settle=False)
        if channel.policy.slow_consumer == "close":
            self.stats["slow_closed"] += 1
            warn.warning("slow consumer: closing", peer=conn.peer, channel=channel.name)
            conn.close(CloseCode.POLICY_VIOLATION, SLOW_REASON)
            return
        self.stats["slow_dropping"] += 1
        warn.warning("slow consumer: dropping its messages", peer=conn.peer, channel=channel.name)

    def _caught_up(self, member: Member) -> None:
        """Drained, and its debt has leaked down to half the limit: it may hold its
        channel again."""
        member.slow = False
        log.debug("slow consumer caught up", peer=member.conn.peer, dropped=member.conn.dropped)

    def _wait_for_broker(self, channel: Channel) -> None:
        if not self.broker.writable() and not channel.broker_wait:
            channel.broker_wait = True
            self.broker.when_writable(lambda: self._broker_ready(channel))

    def _broker_ready(self, channel: Channel) -> None:
        channel.broker_wait = False
        self._release(channel)

    def _release(self, channel: Channel) -> None:
        """Nobody is behind any more: let the held publishers go, in the order they came,
        as long as nobody falls behind again."""
        waiting = channel.waiting
        while waiting and not channel.behind:
            if not self.broker.writable():
                self._wait_for_broker(channel)
                return
            member = waiting.popleft()
            assert member.pending is not None
            payload, text = member.pending
            member.pending = None
            member.conn.hold(-len(payload))
            self._publish(channel, payload, text, member)
            if member.session is not None:  # the controls' ending, after this message
                peer.count(member.conn, member.session)
            if member.conn in channel.members and not member.paced:
                member.conn.resume_reading()
        self._forget_if_empty(channel)

    def _pace(self, member: Member) -> None:
        """``publish_rate``: a token bucket of messages, a second's worth at most; a
        member that has spent it is not read until it has one again (what it sent is
        delivered: pacing loses nothing)."""
        rate, now = self.publish_rate, self._now()
        member.tokens = min(max(rate, 1.0), member.tokens + (now - member.tokens_at) * rate) - 1
        member.tokens_at = now
        if member.tokens < 0 and not member.paced:
            member.paced = True
            member.conn.pause_reading()
            asyncio.get_running_loop().call_later(-member.tokens / rate, self._unpace, member)

    def _unpace(self, member: Member) -> None:
        member.paced = False
        if member.pending is None and member.conn in member.channel.members:
            member.conn.resume_reading()

    def _forget_if_empty(self, channel: Channel) -> None:
        """A channel with no member and no held message is gone (once: several paths
        lead here, and a new channel of the same name may have been made since)."""
        if (
            not channel.members
            and not channel.waiting
            and self.channels.get(channel.name) is channel
        ):
            del self.channels[channel.name]
            self.broker.unsubscribe(channel.name)

    # --- catching up (wsechod.v1 members of channels with history) -----------------------

    def _keep(self, member: Member, at: Position, envelope: Prepared) -> None:
        """A live message for a member still catching up: kept for it, up to the cap; past
        it, let go (it is in history: read again)."""
        if member.backlog is None:
            return
        member.backlog_bytes += len(envelope.frame)
        if member.backlog_bytes > self.cap:
            member.backlog = None
            return
        member.backlog.append((at, envelope))

    async def _catch_up(self, member: Member, since: Position | None) -> None:
        try:
            await self._replay(member, since)
        except ConnectionError as exc:  # the broker's history does not answer
            warn.warning("history unavailable", channel=member.channel.name, error=str(exc))
            member.conn.close(CloseCode.TRY_AGAIN_LATER, "history unavailable: try again")
        except Exception:  # a bug, but one a client may trigger over and over
            log.exception("catching up failed", channel=member.channel.name)
            member.conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _replay(self, member: Member, since: Position | None) -> None:
        """What history holds after ``since`` (None: a member that just joined), as fast
        as the member reads; then the live messages kept meanwhile, without those it got
        from history, and the live stream. The member is told its position (``p``) at
        the junction, or that what it missed is lost (``l``)."""
        channel, conn = member.channel, member.conn
        at, lost = since, False
        while True:
            kept = channel.history
            if kept is not None:
                found = await self.broker.recover(channel.name, at, CHUNK, kept)
                if found.entries is None:
                    at, lost = found.top, True
                    conn.send(history.head(history.LOST, at), text=True)
                else:
                    for entry in found.entries:
                        await self._room(member)
                        at = Position(entry.offset, found.top.epoch)
                        head = history.head(history.MESSAGE, at)
                        conn.send_prepared(prepare(head + entry.payload, entry.text))
                    if len(found.entries) == CHUNK:
                        continue
                    at = found.top if at is None or at.offset < found.top.offset else at
            backlog = member.backlog
            live = [
                (p, m)
                for p, m in backlog or ()
                if at is None or p.epoch != at.epoch or p.offset > at.offset
            ]
            if channel.history is None:  # a reload turned it off, before or during this
                at, lost = NOWHERE, True
                conn.send(history.head(history.LOST, at), text=True)
                break  # what is held goes out as it is (numbered or not)
            assert at is not None
            if backlog is None or (live and live[0][0] != Position(at.offset + 1, at.epoch)):
                member.backlog, member.backlog_bytes = [], 0  # read history again
                continue
            break
        if not lost:
            conn.send(history.head(history.POSITION, at), text=True)
        for _, envelope in live:
            conn.send_prepared(envelope)
        member.backlog, member.catching_up, member.room = None, None, None
        if conn.blocked:
            self.blocked(conn)

    async def _room(self, member: Member) -> None:
        """Until the member's write buffer is under ``write_limit``."""
        while member.conn.blocked:
            if member.room is None:
                member.room = asyncio.Event()
            member.room.clear()
            await member.room.wait()
