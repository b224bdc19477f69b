"""An optional echo peer: picows's server (Cython frame parser, callbacks, no task per
connection) on uvloop, with a SIGTERM drain like wsechod's: close 1001 to every client, exit
when all have answered or after 10 s."""

import asyncio
import os
import signal
import ssl
import sys

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

OPEN: set[WSTransport] = set()


class Echo(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        OPEN.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        OPEN.discard(transport)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    context = None
    if cert := os.environ.get("BENCH_TLS_CERT"):  # the bench's TLS columns
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, os.environ["BENCH_TLS_KEY"])
    server = await ws_create_server(lambda _request: Echo(), "127.0.0.1", port, ssl=context)
    print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop
    server.close()
    clients = list(OPEN)
    for transport in clients:
        transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
    waits = [asyncio.ensure_future(t.wait_disconnected()) for t in clients]
    if waits:
        await asyncio.wait(waits, timeout=10)
    for transport in list(OPEN):
        transport.disconnect(graceful=False)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
