"""Reconnect storms: connections opened and closed as fast as the client can, each a whole
WebSocket life (TCP, TLS where served, the upgrade, a close handshake, the TCP close).

A client library would spend more of the client core than the server under test does, so
this client is a bare ``asyncio.Protocol`` writing its request and close frame as bytes:
the figure that counts is the server's CPU per cycle.
"""

import asyncio
import base64
import functools
import os
import ssl
import time
from collections.abc import Callable

from bench.client import Window, client_cpu

IN_FLIGHT = 50  # connections being opened or closed at once (below the listen backlogs)
DEFLATE = "permessage-deflate; client_max_window_bits"  # what browsers offer
# A client's close frame (1000), masked with a zero mask: a valid frame that is cheap.
CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


class StormError(RuntimeError):
    """A cycle that did not end with a 101 and a clean close."""


class Cycle(asyncio.Protocol):
    """One connection: the upgrade, then a close handshake started by the client."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.head = b""
        self.upgraded = False
        self.closed = False  # the server's close frame came
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.closed = self.closed or data[:1] == b"\x88"
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101 "):
            self.fail(f"not upgraded: {self.head[:60]!r}")
            return
        self.upgraded = True
        rest = self.head[end + 4 :]
        self.closed = rest[:1] == b"\x88"
        assert self.transport is not None
        self.transport.write(CLOSE)

    def eof_received(self) -> bool:
        return False

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(StormError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.upgraded and self.closed:
            self.done.set_result(None)
        else:
            self.done.set_exception(StormError(f"closed early: {exc!r}"))


def request(port: int, *, deflate: bool = False, path: str = "/") -> bytes:
    """An upgrade request as a client sends it (a new key each time)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if deflate:
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def storm(
    port: int,
    *,
    cycles: int,
    server_cpu: Callable[[], float],
    tls: ssl.SSLContext | None = None,
    deflate: bool = False,
) -> Window:
    """``cycles`` connections opened and closed, IN_FLIGHT at a time: the rate, and the
    server's CPU for all of it."""
    loop = asyncio.get_running_loop()
    req = request(port, deflate=deflate)
    left = cycles

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            done: asyncio.Future[None] = loop.create_future()
            cycle = functools.partial(Cycle, req, done)
            await loop.create_connection(cycle, "127.0.0.1", port, ssl=tls)
            await asyncio.wait_for(done, 30)

    t0, s0, c0 = time.perf_counter(), server_cpu(), client_cpu()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    t1, s1, c1 = time.perf_counter(), server_cpu(), client_cpu()
    return Window(t1 - t0, cycles, s1 - s0, c1 - c0)
