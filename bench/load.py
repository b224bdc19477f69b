"""A lean load generator: raw asyncio protocols sending pre-built masked frames.

The client must cost far less per message than the servers under test, or the benchmark
would measure the client. Frames are built once; the client only counts echoed bytes.
"""

import asyncio
import base64
import os
import struct
from typing import cast


def masked_frame(payload: bytes) -> bytes:
    """One FIN binary frame, masked as RFC 6455 requires of clients (fixed key: a benchmark)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + body


class PingPong(asyncio.Protocol):
    """Handshake, then send one frame each time the previous echo has fully arrived."""

    def __init__(self, host: str, port: int, payload: bytes, path: str = "/") -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.frame = masked_frame(payload)
        self.echo_size = 2 + len(payload)
        self.pending = 0
        self.count = 0
        self.running = False
        self.head = b""
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.open.done():
            self.head += data
            if b"\r\n\r\n" in self.head:
                if b" 101 " not in self.head.split(b"\r\n", 1)[0]:
                    self.open.set_exception(ConnectionError(self.head[:80].decode()))
                else:
                    self.open.set_result(None)
            return
        self.pending -= len(data)
        if self.pending <= 0:
            self.count += 1
            if self.running:
                self.send()

    def send(self) -> None:
        self.pending = self.echo_size
        self.transport.write(self.frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.running = False


class Sink(PingPong):
    """A relay receiver: counts whole frames of the known size, never sends."""

    progress: asyncio.Event

    def data_received(self, data: bytes) -> None:
        if not self.open.done():
            super().data_received(data)
            return
        self.pending += len(data)
        self.count += self.pending // self.echo_size
        self.pending %= self.echo_size
        self.progress.set()


async def open_clients(
    port: int, n: int, payload: bytes, path: str = "/", kind: type[PingPong] = PingPong
) -> list[PingPong]:
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(n):
        _, proto = await loop.create_connection(
            lambda: kind("127.0.0.1", port, payload, path), "127.0.0.1", port
        )
        await proto.open
        clients.append(proto)
    return clients


async def fan_out(port: int, receivers: int, payload: bytes, seconds: float) -> int:
    """One publisher, ``receivers`` sinks on one relay channel; returns deliveries made.
    The publisher keeps at most WINDOW messages ahead of the slowest receiver."""
    window = 256
    progress = asyncio.Event()
    sinks = await open_clients(port, receivers, payload, "/bench", Sink)
    for sink in sinks:
        sink.count, sink.pending = 0, 0
        sink.progress = progress  # type: ignore[attr-defined]
    (publisher,) = await open_clients(port, 1, payload, "/bench")
    deadline = asyncio.get_running_loop().time() + seconds
    sent = 0
    while asyncio.get_running_loop().time() < deadline:
        if min(s.count for s in sinks) < sent - window:
            progress.clear()
            await progress.wait()
            continue
        for _ in range(32):
            publisher.transport.write(publisher.frame)
        sent += 32
    total = sum(s.count for s in sinks)
    close_all([*sinks, publisher])
    return total


async def run_for(clients: list[PingPong], seconds: float) -> int:
    """Ping-pong on every client for ``seconds``; return the number of echoes received."""
    for c in clients:
        c.count, c.running = 0, True
        c.send()
    await asyncio.sleep(seconds)
    for c in clients:
        c.running = False
    return sum(c.count for c in clients)


def close_all(clients: list[PingPong]) -> None:
    for c in clients:
        c.transport.close()
