"""Echo handler: every message goes back with its type and payload, in order."""

from websockets.asyncio.server import ServerConnection


async def echo(ws: ServerConnection) -> None:
    # send() writes the frame before its first await, so a message this loop has received
    # is on the wire before any close frame the drain might queue after it.
    async for message in ws:
        await ws.send(message)
