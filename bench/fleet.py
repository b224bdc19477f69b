"""``python -m bench.fleet SOURCE PORT``: one client process of the scale bench
(``bench.scale``), holding up to 19,000 idle WebSocket connections from its own loopback
source address (127.0.0.x: each address has its own ephemeral ports, so six of them stay
clear of the 28,000 a single one has).

Each connection is a bare ``asyncio.Protocol``: it answers the server's pings and closes,
and, once told to, reconnects as soon as it is closed (retrying every RETRY seconds while
the port refuses or the server answers other than 101), noting how long it was away. A
client process has IN_FLIGHT handshakes under way at most, reconnections included: what
one process of a real client fleet could do, and below the listen backlog (a SYN beyond
it is dropped, and retried by the kernel only after 1, 3, 7 seconds).

Commands come one per line on stdin, the answers go to stdout as one JSON object per line:

- ``open N [PATH]``: open N connections, IN_FLIGHT at a time; ``{"opened", "failed",
  "seconds"}``
- ``reconnect``: from now on, a connection closed by the server comes back
- ``forget``: the times away, attempts and refusals counted so far (a new storm)
- ``status``: ``{"open", "pings", "closes", "away_max", "away_p99", "back",
  "retries", "refusals"}``
- ``quit``
"""

import asyncio
import collections
import contextlib
import json
import os
import random
import resource
import socket
import ssl
import sys
import time
from collections.abc import Mapping

import uvloop

from bench import storm

IN_FLIGHT = 200  # handshakes under way at once, per client process
RETRY = 0.1  # seconds between attempts while the server does not listen (with jitter)
IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>


class Fleet:
    """Every connection of this process, and what they have seen."""

    def __init__(self, source: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.source, self.port, self.tls = source, port, tls
        self.path = "/"
        self.open = 0
        self.pings = 0
        self.closes: collections.Counter[int] = collections.Counter()
        self.reconnect = False
        self.away: list[float] = []  # seconds from a server's close to the next 101
        self.retries = 0
        self.refusals: collections.Counter[str] = collections.Counter()  # by status
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(IN_FLIGHT)

    async def connect(self, since: float | None = None) -> bool:
        """One connection up to its 101; False if refused (it is not retried here)."""
        async with self.slots:
            return await self._connect(since)

    async def _connect(self, since: float | None) -> bool:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[bool] = loop.create_future()
        sock = socket.socket()
        try:
            # The port is chosen at connect, not at bind: bind(port 0) searches the
            # address's ports one by one, ever slower as they fill (minutes for 17,000).
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            await loop.create_connection(
                lambda: Idle(self, opened, since),
                sock=sock,
                ssl=self.tls,
                server_hostname="127.0.0.1" if self.tls else None,
            )
        except OSError:
            with contextlib.suppress(OSError):  # uvloop may have closed it already
                sock.close()
            return False
        return await opened

    async def open_many(self, count: int) -> dict[str, float]:
        t0 = time.perf_counter()
        failed = 0

        async def one() -> None:
            nonlocal failed
            if not await self.connect():
                failed += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return {"opened": count - failed, "failed": failed, "seconds": time.perf_counter() - t0}

    def come_back(self, since: float) -> None:
        task = asyncio.ensure_future(self._come_back(since))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _come_back(self, since: float) -> None:
        while not await self.connect(since):
            self.retries += 1
            await asyncio.sleep(RETRY * (0.5 + random.random()))

    def status(self) -> dict[str, object]:
        away = sorted(self.away)
        return {
            "open": self.open,
            "pings": self.pings,
            "closes": {str(code): n for code, n in self.closes.items()},
            "away_max": away[-1] if away else 0.0,
            "away_p99": away[int(0.99 * (len(away) - 1))] if away else 0.0,
            "back": len(away),
            "retries": self.retries,
            "refusals": dict(self.refusals),
        }


class Idle(asyncio.Protocol):
    """One idle client: the upgrade, then pongs, and the close handshake."""

    __slots__ = ("buffer", "fleet", "opened", "since", "transport", "upgraded")

    def __init__(self, fleet: Fleet, opened: asyncio.Future[bool], since: float | None) -> None:
        self.fleet = fleet
        self.opened = opened
        self.since = since  # when the server closed the connection this one replaces
        self.buffer = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        fleet = self.fleet
        transport.write(storm.request(fleet.port, path=fleet.path))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101 "):
                body = self.buffer[end + 4 :].split(b"\n", 1)[0]  # its reason, if it came
                why = (self.buffer[9:12] + b" " + body).decode(errors="replace").strip()
                self.fleet.refusals[why] += 1
                self.opened.set_result(False)
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.buffer = self.buffer[end + 4 :]
            self.fleet.open += 1
            if self.since is not None:
                self.fleet.away.append(time.monotonic() - self.since)
            self.opened.set_result(True)
        self.frames()

    def frames(self) -> None:
        """Server frames are unmasked; only control frames come to an idle client."""
        buffer = self.buffer
        while len(buffer) >= 2:
            size = buffer[1] & 0x7F
            if len(buffer) < 2 + size:
                break
            opcode, payload, buffer = buffer[0] & 0x0F, buffer[2 : 2 + size], buffer[2 + size :]
            assert self.transport is not None
            if opcode == 0x9:  # ping: the pong, masked with a zero mask
                self.fleet.pings += 1
                self.transport.write(bytes((0x8A, 0x80 | size)) + b"\0\0\0\0" + payload)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if size >= 2 else 1005
                self.fleet.closes[code] += 1
                self.transport.write(bytes((0x88, 0x82)) + b"\0\0\0\0" + payload[:2])
        self.buffer = buffer

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
            return
        if self.upgraded:
            self.fleet.open -= 1
            if self.fleet.reconnect:
                self.fleet.come_back(time.monotonic())


async def main(source: str, port: int, tls: ssl.SSLContext | None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fleet = Fleet(source, port, tls)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(answer: Mapping[str, object]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    while line := (await reader.readline()).decode().split():
        command, *args = line
        if command == "open":
            fleet.path = args[1] if len(args) > 1 else "/"
            say(await fleet.open_many(int(args[0])))
        elif command == "reconnect":
            fleet.reconnect = True
            say({"reconnect": True})
        elif command == "status":
            say(fleet.status())
        elif command == "forget":  # a new storm: its own times away and attempts
            fleet.away.clear()
            fleet.retries = 0
            fleet.refusals.clear()
            say({"forget": True})
        elif command == "quit":
            break
    for task in fleet.tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*fleet.tasks, return_exceptions=True)


if __name__ == "__main__":
    cert = os.environ.get("BENCH_TLS_CERT")  # the coordinator's (bench.tls), when over TLS
    tls_context = ssl.create_default_context(cafile=cert) if cert else None
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), tls_context))
