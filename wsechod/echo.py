"""Echo handler: every message goes back with its type and payload, in order."""

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from wsechod.server import Tally


async def echo(ws: ServerConnection, tally: Tally) -> None:
    # send() writes the frame before its first await, so a message this loop has received
    # is on the wire before any close frame the drain might queue after it.
    async for message in ws:
        tally.received += 1
        try:
            await ws.send(message)
        except ConnectionClosed:
            continue  # closing: the protocol forbids answering; count what still arrives
        tally.sent += 1
