"""Channels for relay mode: who is on which path, and fan-out that a slow reader cannot stall.

A message is encoded once and written to every receiver with websockets' ``broadcast()``.
Writing never waits, so the publisher, not the receivers, absorbs the back-pressure: while a
receiver's write buffer is above ``write_limit``, a publisher's handler waits before writing
(and so stops reading its own socket) until the receiver drains. A receiver still above the
limit after ``slow_consumer_timeout`` is a slow consumer: per ``slow_consumer`` it is skipped
(its messages dropped and counted) until it catches up, or closed. Either way a client that
stops reading holds at most ``write_limit`` plus one message per publisher that was already
writing, and holds the others up for at most ``slow_consumer_timeout``.
"""

import asyncio
import http
import re

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.typing import Data

from wsechod.brokers.base import Broker
from wsechod.server import Reply, Tally
from wsechod.settings import Settings

log = structlog.stdlib.get_logger("wsechod.relay")

# RFC 3986 path characters: anything else in a channel name is refused with 400.
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
SLOW_REASON = "slow consumer"


def channel_of(path: str) -> str:
    """The channel is the request path, without the query string."""
    return path.partition("?")[0]


class Hub:
    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.channels: dict[str, dict[ServerConnection, Tally]] = {}
        self.skipped: set[ServerConnection] = set()  # slow consumers not written to
        self.dropped = 0  # messages not delivered to slow consumers, in total
        self._closing: set[asyncio.Task[None]] = set()
        self._watched: set[ServerConnection] = set()  # lagging behind remote messages

    def admit(self, path: str) -> Reply | None:
        """Refuse, before the handshake, a channel name or a member over the limits."""
        s = self.settings
        channel = channel_of(path)
        if len(channel) > s.max_path_length:
            return http.HTTPStatus.REQUEST_URI_TOO_LONG, "channel name too long\n", {}
        if not _PATH.fullmatch(channel):
            return http.HTTPStatus.BAD_REQUEST, "invalid character in channel name\n", {}
        members = self.channels.get(channel)
        if members is None and len(self.channels) >= s.max_channels:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "too many channels\n", {}
        if members is not None and len(members) >= s.max_channel_members:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "channel is full\n", {}
        return None

    def join(self, channel: str, ws: ServerConnection, tally: Tally) -> None:
        members = self.channels.setdefault(channel, {})
        if not members:
            self.broker.subscribe(channel)
        members[ws] = tally

    def leave(self, channel: str, ws: ServerConnection) -> None:
        members = self.channels.get(channel, {})
        tally = members.pop(ws, None)
        if tally is not None and tally.dropped:
            log.info("slow consumer left", peer=ws.remote_address, dropped=tally.dropped)
        self.skipped.discard(ws)
        if not members:
            self.channels.pop(channel, None)
            self.broker.unsubscribe(channel)

    async def publish(self, channel: str, message: Data, sender: ServerConnection) -> None:
        """A local client's message: to the other members here, and to other instances.

        It waits *before* writing while a receiver is above ``write_limit``, so however
        many clients publish at once, none adds to a buffer that is already full.
        """
        exclude = None if self.settings.relay_echo else sender
        while not self.broker.writable():  # other instances are behind: pace this publisher
            await self._writable()
        while lagging := self._lagging(channel, exclude):
            await self._hold(lagging)
        self._fan_out(channel, message, exclude)
        if isinstance(message, str):
            self.broker.publish(channel, message.encode(), True)
        else:
            self.broker.publish(channel, bytes(message), False)

    async def _writable(self) -> None:
        ready = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not ready.done():  # this handler may have been cancelled meanwhile
                ready.set_result(None)

        self.broker.when_writable(wake)
        await ready

    def _lagging(self, channel: str, exclude: ServerConnection | None) -> list[ServerConnection]:
        return [
            ws
            for ws in self.channels.get(channel, ())
            if ws.paused
            and ws is not exclude
            and ws not in self.skipped
            and ws.protocol.state is State.OPEN
        ]

    def deliver(self, channel: str, payload: bytes, text: bool) -> None:
        """A message from another instance: to every member here. Nobody can be held up
        here (the broker serves every channel), so a lagging receiver is only watched."""
        message: Data = payload.decode() if text else payload
        for ws in self._fan_out(channel, message, None):
            if ws not in self._watched:
                self._watched.add(ws)
                asyncio.get_running_loop().call_later(
                    self.settings.slow_consumer_timeout, self._judge, ws
                )

    def _judge(self, ws: ServerConnection) -> None:
        self._watched.discard(ws)
        if ws.paused and ws.protocol.state is State.OPEN and ws not in self.skipped:
            self._slow(ws)

    def _fan_out(
        self, channel: str, message: Data, exclude: ServerConnection | None
    ) -> list[ServerConnection]:
        members = self.channels.get(channel)
        if not members:
            return []
        receivers = []
        for ws, tally in members.items():
            if ws is exclude:
                continue
            if ws in self.skipped:
                if ws.paused:
                    tally.dropped += 1
                    self.dropped += 1
                    continue
                self.skipped.discard(ws)  # it has drained: deliver again
                log.info("slow consumer caught up", peer=ws.remote_address, dropped=tally.dropped)
            tally.sent += 1
            receivers.append(ws)
        broadcast(receivers, message)
        return [ws for ws in receivers if ws.paused]

    async def _hold(self, lagging: list[ServerConnection]) -> None:
        """Hold this publisher until the lagging receivers drain, for a bounded time."""
        drains = [asyncio.ensure_future(ws.drain()) for ws in lagging]
        done, pending = await asyncio.wait(drains, timeout=self.settings.slow_consumer_timeout)
        for drain in pending:
            drain.cancel()
        for drain in done:
            drain.exception()  # a receiver that vanished meanwhile is not an error here
        for ws in lagging:
            if ws.paused and ws.protocol.state is State.OPEN and ws not in self.skipped:
                self._slow(ws)

    def _slow(self, ws: ServerConnection) -> None:
        self.skipped.add(ws)
        if self.settings.slow_consumer == "close":
            log.warning("slow consumer: closing", peer=ws.remote_address)
            task = asyncio.create_task(ws.close(CloseCode.POLICY_VIOLATION, SLOW_REASON))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            log.warning("slow consumer: dropping its messages", peer=ws.remote_address)
