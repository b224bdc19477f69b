"""Redis pub/sub between instances (redis-py's asyncio client).

Each instance subscribes only to the channels it has members on (Redis channel
``wsechod:<path>``) and publishes each relayed message once, prefixed with its own random
id and the frame type, so it can ignore its own messages when Redis echoes them back: a
client never gets a message twice. Publishing goes through one queue (bounded in bytes) and
one task, so a slow or absent Redis never blocks the relay and per-sender order is kept;
nothing is retried, so delivery between instances is at most once.

When Redis is unreachable the instance keeps relaying between its own members, reports
``degraded``, and reconnects with exponential backoff (0.1 s to 5 s), resubscribing to its
channels. Messages published while Redis is down do not reach other instances.
"""

import asyncio
import os
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from wsechod.brokers.base import Deliver

log = structlog.stdlib.get_logger("wsechod.broker")

PREFIX = "wsechod:"
CONTROL = PREFIX + "\0control"  # always subscribed: keeps the subscriber connection alive
TEXT, BINARY = b"t", b"b"
ID_SIZE = 8
OUTBOX_BYTES = 64 * 2**20  # queued for Redis before new messages are dropped (slow Redis)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
SOCKET_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 5.0
CLOSE_TIMEOUT = 1.0


def _client(url: str) -> aioredis.Redis:
    """No retries inside redis-py: a retried PUBLISH can be delivered twice, and a retried
    command keeps a cancelled task alive. Timeouts and pings notice a hung Redis."""
    return aioredis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )


def _stopping() -> bool:
    """redis-py may turn our cancellation into a ConnectionError; do not retry then."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RedisBroker:
    def __init__(self, url: str) -> None:
        self.url = url
        self.id = os.urandom(ID_SIZE)
        self.channels: set[str] = set()
        self.connected = False
        self.unsent = 0  # messages that could not be handed to Redis
        self.malformed = 0  # messages from Redis that were not ours to read
        self.generation = 0  # bumped on each (re)connection: the publisher starts afresh
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._queued = 0  # bytes in the outbox
        self._changes: asyncio.Queue[None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._tasks = [
            asyncio.create_task(self._subscriber()),
            asyncio.create_task(self._publisher()),
        ]

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self._changes.put_nowait(None)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self._changes.put_nowait(None)

    def publish(self, channel: str, body: bytes, text: bool) -> None:
        if not self.connected:
            self.unsent += 1
            return
        payload = self.id + (TEXT if text else BINARY) + body
        if self._queued + len(payload) > OUTBOX_BYTES:
            self.unsent += 1
            return
        self._queued += len(payload)
        self._outbox.put_nowait((PREFIX + channel, payload))

    def writable(self) -> bool:
        return True

    def when_writable(self, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(callback)

    def stats(self) -> dict[str, int]:
        return {"unsent": self.unsent, "malformed": self.malformed}

    def degraded(self) -> str | None:
        return None if self.connected else "redis broker unreachable"

    async def close(self) -> None:
        """Stop relaying through Redis; dropping the subscriber connection unsubscribes."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)

    async def _publisher(self) -> None:
        client, generation = _client(self.url), self.generation
        try:
            while True:
                channel, payload = await self._outbox.get()
                self._queued -= len(payload)
                if generation != self.generation:  # Redis came back: no stale connection
                    await client.aclose()
                    client, generation = _client(self.url), self.generation
                try:
                    await client.publish(channel, payload)  # at most once: never retried
                except Exception as exc:  # this task must not die
                    if _stopping():
                        raise
                    self.unsent += 1
                    log.debug("publish failed", channel=channel, error=str(exc))
        finally:
            await client.aclose()

    async def _subscriber(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            client = _client(self.url)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CONTROL)
                subscribed: set[str] = set()
                subscribed = await self._sync(pubsub, subscribed)
                self.connected = True
                self.generation += 1
                backoff = BACKOFF_MIN
                log.info("broker connected", url=self.url, channels=len(subscribed))
                await self._relay(pubsub, subscribed)
            except (RedisError, OSError) as exc:
                if _stopping():
                    raise asyncio.CancelledError from exc
                if self.connected:
                    log.warning("broker unreachable: relaying locally only", error=str(exc))
                self.connected = False
            except Exception:  # a bug must not end cross-instance relay for good
                if _stopping():
                    raise
                log.exception("broker subscriber failed; reconnecting")
                self.connected = False
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _relay(self, pubsub: aioredis.client.PubSub, subscribed: set[str]) -> None:
        """Deliver what other instances publish, and follow local joins and leaves."""
        while True:
            if _stopping():
                raise asyncio.CancelledError
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                await self._received(message)
            else:
                # get_message() can return at once without yielding (a connection redis-py
                # has given up on): yield, so that a cancel can reach us.
                await asyncio.sleep(0)
            if not self._changes.empty():
                while not self._changes.empty():
                    self._changes.get_nowait()
                subscribed = await self._sync(pubsub, subscribed)

    async def _sync(self, pubsub: aioredis.client.PubSub, subscribed: set[str]) -> set[str]:
        """Make the Redis subscriptions match the channels with local members."""
        wanted = set(self.channels)
        if added := wanted - subscribed:
            await pubsub.subscribe(*(PREFIX + c for c in added))
        if removed := subscribed - wanted:
            await pubsub.unsubscribe(*(PREFIX + c for c in removed))
        if wanted != subscribed:
            log.debug("broker subscriptions", channels=sorted(wanted))
        return wanted

    async def _received(self, message: dict[str, object]) -> None:
        payload = message.get("data")
        channel = message.get("channel")
        if not isinstance(payload, bytes) or not isinstance(channel, bytes):
            return
        if payload[:ID_SIZE] == self.id:
            return  # our own message coming back: already delivered locally
        kind, body = payload[ID_SIZE : ID_SIZE + 1], payload[ID_SIZE + 1 :]
        try:
            if kind not in (TEXT, BINARY):
                raise ValueError(f"unknown frame type {kind!r}")
            if kind == TEXT:
                body.decode()
            name = channel.decode()[len(PREFIX) :]
        except ValueError as exc:  # UnicodeDecodeError too: someone else's message
            self.malformed += 1
            log.warning("malformed message from redis dropped", error=str(exc))
            return
        assert self._deliver is not None
        self._deliver(name, body, kind == TEXT)
