"""The in-process broker: every member is local, so there is nothing to carry."""

from websockets.typing import Data

from wsechod.brokers.base import Deliver


class MemoryBroker:
    async def start(self, deliver: Deliver) -> None:
        pass

    def subscribe(self, channel: str) -> None:
        pass

    def unsubscribe(self, channel: str) -> None:
        pass

    def publish(self, channel: str, message: Data) -> None:
        pass

    def degraded(self) -> str | None:
        return None

    async def close(self) -> None:
        pass
