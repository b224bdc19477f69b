"""The test peer's slow network (``engine/throttle.py``) between a real transport, plain or
TLS, and a protocol that writes whenever it is not paused (as the echo does while it
reads): only the throttle pauses and resumes it, what it holds stays near write_limit,
and it wakes up at most as often as it says."""

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import uvloop

from wsechod.engine.throttle import MIN_WAIT, STEP, Throttled

pytestmark = pytest.mark.unit
LIMIT = 32 * 2**10  # the connection's write_limit
CHUNK = 10_000  # what the protocol writes every 10 ms while it may


class Writer(asyncio.Protocol):
    """Writes CHUNK every 10 ms unless paused, and at once when resumed; records who paused
    it and the most the throttle ever held."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.throttled: Throttled | None = None
        self.paused = False
        self.pauses = self.resumes = 0
        self.most = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel fills soon
        self.throttled = Throttled(transport, self.rate)  # type: ignore[arg-type]
        self.throttled.set_write_buffer_limits(high=LIMIT, low=LIMIT // 4)
        self.throttled.set_protocol(self)
        asyncio.get_running_loop().call_soon(self.tick)

    def tick(self) -> None:
        assert self.throttled is not None
        if self.done.done():
            return
        if not self.paused:
            self.throttled.write(b"x" * CHUNK)
        self.most = max(self.most, self.throttled.get_write_buffer_size())
        asyncio.get_running_loop().call_later(0.01, self.tick)

    def pause_writing(self) -> None:
        assert not self.paused, "paused twice: someone else's flow control"
        self.paused, self.pauses = True, self.pauses + 1

    def resume_writing(self) -> None:
        assert self.paused, "resumed without a pause: someone else's flow control"
        self.paused, self.resumes = False, self.resumes + 1
        assert self.throttled is not None
        self.throttled.write(b"x" * CHUNK)  # at once, as the echo does with what it read

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield server, client


def client_reads(port: int, context: ssl.SSLContext | None, quiet: float, seconds: float) -> int:
    """A client that reads nothing for ``quiet`` seconds (small buffers: they fill), then
    everything for ``seconds``: the bytes it got."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
    time.sleep(quiet)
    got = 0
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got += len(sock.recv(65536))
        except TimeoutError:
            continue
    sock.close()
    return got


def run(rate: int, context: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> tuple[Writer, int]:
    async def main() -> tuple[Writer, int]:
        loop = asyncio.get_running_loop()
        writers: list[Writer] = []

        def make() -> Writer:
            writers.append(Writer(rate))
            return writers[-1]

        server = await loop.create_server(make, "127.0.0.1", 0, ssl=context[0] if context else None)
        port = server.sockets[0].getsockname()[1]
        client = context[1] if context else None
        got = await asyncio.to_thread(client_reads, port, client, 1.5, 2.5)
        await asyncio.wait_for(writers[0].done, 10)
        server.close()
        return writers[0], got

    return uvloop.run(main())


@pytest.mark.timeout(30)
def test_over_tls_only_the_throttle_pauses_and_what_it_holds_stays_bounded(
    certificate: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The TLS transport's own flow control used to resume the protocol while the throttle
    held more than write_limit: it then grew by what the protocol wrote (1 MB/s here)."""
    writer, got = run(100_000, certificate)
    assert writer.pauses >= 1 and got > 0
    assert writer.most <= LIMIT + CHUNK + 10_000, writer.most  # + a chunk and a step


@pytest.mark.timeout(30)
def test_a_throttle_faster_than_the_client_resumes_once_the_client_reads() -> None:
    """A step (rate/10) larger than the low mark: the throttle's buffer empties while the
    real transport still holds more than it; it used to stay paused for good."""
    writer, got = run(1_000_000, None)
    assert writer.pauses >= 1
    assert writer.resumes >= 1  # the client read: the protocol writes again
    assert got > 2 * LIMIT


@pytest.mark.timeout(30)
def test_the_throttle_wakes_up_at_most_as_often_as_it_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume inside the throttle's own pump used to start a second chain of timers,
    then a third: wake-ups grew with every resume."""
    pumps = 0
    pump = Throttled._pump

    def counting(self: Throttled) -> None:
        nonlocal pumps
        pumps += 1
        pump(self)

    monkeypatch.setattr(Throttled, "_pump", counting)
    started = time.monotonic()
    run(50_000, None)
    took = time.monotonic() - started
    # At most one pump per MIN_WAIT while there is something to write, and one per STEP
    # while waiting: far fewer than the protocol's 100 writes a second.
    assert pumps <= took / min(MIN_WAIT, STEP) + 10, (pumps, took)
