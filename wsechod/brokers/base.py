"""The interface between the relay's Hub and a broker."""

from collections.abc import Awaitable, Callable
from typing import Protocol

from websockets.typing import Data

# Called with (channel, message) for each message another instance published.
Deliver = Callable[[str, Data], Awaitable[None]]


class Broker(Protocol):
    async def start(self, deliver: Deliver) -> None: ...

    def subscribe(self, channel: str) -> None: ...

    def unsubscribe(self, channel: str) -> None: ...

    def publish(self, channel: str, message: Data) -> None: ...

    def degraded(self) -> str | None:
        """Why cross-instance relay is not working right now, or None."""

    async def close(self) -> None: ...
