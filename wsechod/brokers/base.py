"""The interface between the relay and a broker.

It speaks bytes and plain callbacks, not websockets types, so that any relay engine can
drive it: payloads are bytes with a ``text`` flag, and remote messages arrive through a
synchronous callback on the event loop (a broker must never wait on its consumer).
"""

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

from wsechod.history import History, Position, Recovery

# Called on the loop with (channel, payload, text, position, origin) for each message
# another instance published (origin 0), and for each of ours with history, once numbered
# (position: its offset and epoch; origin: what ``publish`` was given). Whether it reached
# anyone here.
Deliver = Callable[[str, bytes, bool, Position | None, int], bool]

# Presence: the members of a channel here, their number and the connections of each sub
# (members without a token are in the number only); and all of them, by channel.
Members = tuple[int, Mapping[str, int]]
Snapshot = Callable[[], Mapping[str, Members]]


class PresenceUnavailable(ConnectionError):
    """Presence cannot be read now (the broker's store does not answer)."""


class Broker(Protocol):
    async def start(self, deliver: Deliver, snapshot: Snapshot) -> None:
        """Start carrying messages (``deliver`` those of others) and presence (read
        ``snapshot`` for the members here)."""

    def subscribe(self, channel: str) -> None: ...

    def unsubscribe(self, channel: str) -> None: ...

    def publish(
        self,
        channel: str,
        payload: bytes,
        text: bool,
        *,
        history: History | None = None,
        origin: int = 0,
    ) -> "asyncio.Future[Position | None] | None":
        """Queue a local message for other instances; never blocks, never raises. With
        ``history``: numbered and kept, then handed to every instance, this one included
        (``deliver``, with ``origin``); the future says where it was kept (None: lost)."""

    async def recover(
        self, channel: str, since: Position | None, limit: int, history: History
    ) -> Recovery:
        """At most ``limit`` messages after ``since`` (None: none, just the position);
        ConnectionError if history cannot be read now."""

    def writable(self) -> bool:
        """False while messages are queued above the high-water mark and the broker is
        healthy: the caller should stop reading its publishers until ``when_writable``."""

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, with ``loop.call_soon``, as soon as ``writable()``."""

    def degraded(self) -> str | None:
        """Why cross-instance relay is not working right now, or None."""

    def stats(self) -> dict[str, int]:
        """Counters for logs and metrics (published, delivered, lost, ...)."""

    def presence_changed(self) -> None:
        """A member joined or left here: others should know soon."""

    async def channel_counts(self) -> dict[str, int]:
        """Members per channel on every instance (PresenceUnavailable)."""

    async def channel_members(self, channel: str) -> Members:
        """The members of one channel on every instance (PresenceUnavailable)."""

    async def close(self) -> None: ...
