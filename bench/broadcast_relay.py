"""The fan-out baseline: a relay written the way websockets documents ``broadcast()``, with
the asyncio API: clients on the same URL path form a channel, and each message goes to every
other member. Same SIGTERM handling as the deployment-docs example."""

import asyncio
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

CHANNELS: dict[str, set[ServerConnection]] = {}


async def relay(websocket: ServerConnection) -> None:
    path = websocket.request.path.split("?", 1)[0] if websocket.request else "/"
    members = CHANNELS.setdefault(path, set())
    members.add(websocket)
    try:
        async for message in websocket:
            broadcast((member for member in members if member is not websocket), message)
    finally:
        members.discard(websocket)
        if not members:
            del CHANNELS[path]


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(relay, "127.0.0.1", port) as server:
        print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
