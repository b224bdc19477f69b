"""The interface between the relay and a broker."""

from collections.abc import Callable
from typing import Protocol

# Called with (channel, payload, text) for each message another instance published.
Deliver = Callable[[str, bytes, bool], None]


class Broker(Protocol):
    async def start(self, deliver: Deliver) -> None: ...

    def subscribe(self, channel: str) -> None: ...

    def unsubscribe(self, channel: str) -> None: ...

    def publish(self, channel: str, payload: bytes, text: bool) -> None: ...

    def writable(self) -> bool:
        """False while published messages cannot leave fast enough: hold publishers."""

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (soon, on the loop) once ``writable()`` is true again."""

    def degraded(self) -> str | None:
        """Why cross-instance relay is not working right now, or None."""

    def stats(self) -> dict[str, int]: ...

    async def close(self) -> None: ...
