"""The seed's example and the benchmark's baseline: the websockets deployment-docs server
written with the old API (``websockets.legacy.server.serve``, what ``websockets.serve`` was
before websockets 14): a SIGTERM future and ``serve()``, echo with ``async for``.
Printing the port is the only addition, so the harness can find it."""

import asyncio
import signal
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # "websockets.legacy is deprecated"
    from websockets.legacy.server import WebSocketServerProtocol, serve


async def echo(websocket: WebSocketServerProtocol) -> None:
    async for message in websocket:
        await websocket.send(message)


async def main(port: int) -> None:
    # Set the stop condition when receiving SIGTERM.
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(echo, "127.0.0.1", port) as server:
        print(f"listening 127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
