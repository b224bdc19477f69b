"""Relay handler: what a client sends goes to the other clients on the same path."""

from websockets.asyncio.server import ServerConnection

from wsechod.channels import Hub, channel_of
from wsechod.server import Handler, Tally


def make_relay(hub: Hub) -> Handler:
    async def relay(ws: ServerConnection, tally: Tally) -> None:
        assert ws.request is not None
        channel = channel_of(ws.request.path)
        hub.join(channel, ws, tally)
        try:
            async for message in ws:
                tally.received += 1
                await hub.publish(channel, message, ws)
        finally:
            hub.leave(channel, ws)

    return relay
