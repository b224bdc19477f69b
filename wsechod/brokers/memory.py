"""The in-process broker: every member is local, so there is nothing to carry."""

import asyncio
from collections.abc import Callable

from wsechod.brokers.base import Deliver


class MemoryBroker:
    async def start(self, deliver: Deliver) -> None:
        pass

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

    async def close(self) -> None:
        pass
