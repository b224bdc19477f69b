"""Echo: every frame goes back as it arrives, with its type and payload, in order.

Frames are echoed one by one, so a message of any number of fragments costs one frame of
memory; the engine stops reading from a client whose echoes it does not read.
"""

from wsechod.engine.interface import Connection, Family, Figures, Reply, Request


class Echo:
    def admit(self, request: Request) -> Reply | None:
        return None

    def opened(self, conn: Connection) -> None:
        pass

    def data(self, conn: Connection, payload: bytes, text: bool, first: bool, last: bool) -> None:
        conn.send(payload, text=text, first=first, last=last)

    def blocked(self, conn: Connection) -> None:
        pass

    def unblocked(self, conn: Connection) -> None:
        pass

    def closed(self, conn: Connection) -> None:
        pass

    def degraded(self) -> str | None:
        return None

    def families(self) -> tuple[Family, ...]:
        return ()

    def figures(self) -> Figures:
        return Figures()
