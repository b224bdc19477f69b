"""The in-process broker: every member is local, so there is nothing to carry, and
presence is what this process has."""

import asyncio
from collections.abc import Callable

from wsechod.brokers.base import Deliver, Members, Snapshot


class MemoryBroker:
    def __init__(self) -> None:
        self._snapshot: Snapshot = dict

    async def start(self, deliver: Deliver, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def subscribe(self, channel: str) -> None:
        pass

    def unsubscribe(self, channel: str) -> None:
        pass

    def publish(self, channel: str, payload: bytes, text: bool) -> None:
        pass

    def writable(self) -> bool:
        return True

    def when_writable(self, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(callback)

    def degraded(self) -> str | None:
        return None

    def stats(self) -> dict[str, int]:
        return {}

    def presence_changed(self) -> None:
        pass

    async def channel_counts(self) -> dict[str, int]:
        return {name: count for name, (count, _) in self._snapshot().items()}

    async def channel_members(self, channel: str) -> Members:
        return self._snapshot().get(channel, (0, {}))

    async def close(self) -> None:
        pass
