"""The engine's state machine in-process, on a transport that a test can fill and drain at
will: corner cases of flow control and timers that real sockets reach only by luck.
Behaviour over real sockets is in test_protocol.py and test_relay.py."""

import asyncio
import logging
import struct
from collections.abc import Iterator

import pytest
import uvloop
from websockets.extensions.permessage_deflate import PerMessageDeflate

from tests.rawws import OP_BINARY, OP_PING, OP_PONG, frame
from wsechod.apps.echo import Echo
from wsechod.apps.relay import Relay
from wsechod.brokers.memory import MemoryBroker
from wsechod.engine import Application, Connection, Engine, Options, connection, frames
from wsechod.engine.connection import WebSocket
from wsechod.engine.deflate import Deflate, compress_whole
from wsechod.runtime import run

pytestmark = pytest.mark.unit  # in-process: make check runs it


class Transport:
    """Buffers what is written until ``drain()``; calls pause/resume_writing like uvloop."""

    def __init__(self) -> None:
        self.size = self.high = self.low = 0
        self.over = False
        self.reading = True
        self.closed = False
        self.protocol: WebSocket | None = None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.high, self.low = high, low

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.high and not self.over:
            self.over = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        for part in parts:
            self.write(part)

    def drain(self) -> None:
        self.size = 0
        if self.over:
            self.over = False  # uvloop clears its flag before calling resume_writing
            assert self.protocol is not None
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.size

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    abort = close

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connect(engine: Engine, path: str = "/room") -> tuple[WebSocket, Transport]:
    t = Transport()
    ws = WebSocket(engine, t, path, "peer", None)  # type: ignore[arg-type]
    t.protocol = ws
    engine.opened(ws)
    return ws, t


def turn(engine: Engine, ws: WebSocket, data: bytes) -> None:
    """One read in one turn of the loop; at its end, what the turn wrote goes out (the
    engine corks writes until then)."""
    ws.data_received(data)
    engine.uncork()


def make_engine(loop: asyncio.AbstractEventLoop, app: Application, **options: float) -> Engine:
    async def build() -> Engine:
        return Engine(Options(**options), app)  # type: ignore[arg-type]

    return loop.run_until_complete(build())


def test_reading_stays_paused_when_a_release_refills_the_buffer(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A relay receiver drains; releasing the held publisher writes to it again and fills
    it past write_limit inside resume_writing. Reading must stay paused (it used to resume
    while the buffer was full, and pongs then grew it without bound)."""

    async def main() -> None:
        relay = Relay(MemoryBroker(), write_limit=1000, max_size=10_000, slow_consumer_timeout=60)
        engine = Engine(Options(write_limit=1000, max_size=10_000, ping_interval=0), relay)
        receiver, rt = connect(engine)
        publisher, _ = connect(engine)
        turn(engine, publisher, frame(OP_BINARY, bytes(1500)))  # receiver now behind
        turn(engine, publisher, frame(OP_BINARY, bytes(1500)))  # held with its publisher
        assert receiver.blocked and not rt.reading
        rt.drain()  # the held message is written to it at once: full again
        assert receiver.blocked
        assert not rt.reading
        for _ in range(1000):  # a client that sends pings and never reads
            turn(engine, receiver, frame(OP_PING, b"p" * 125))
        assert rt.size < 1000 + 10_000 + 1500 + 127 * 2

    loop.run_until_complete(main())


@pytest.mark.parametrize(("interval", "timeout"), [(0.05, 0.0), (0.05, 0.4)])
def test_keepalive_wakes_up_once_per_ping_while_it_waits_for_the_pong(
    loop: asyncio.AbstractEventLoop, interval: float, timeout: float
) -> None:
    """With ``ping_timeout`` 0 (wait forever) or longer than ``ping_interval``, the timer
    used to spin every millisecond until the pong came."""
    calls = 0
    original = WebSocket._keepalive

    def counting(self: WebSocket) -> None:
        nonlocal calls
        calls += 1
        original(self)

    async def main() -> WebSocket:
        engine = Engine(Options(ping_interval=interval, ping_timeout=timeout), Echo())
        ws, _ = connect(engine, "/")
        await asyncio.sleep(0.3)
        return ws

    WebSocket._keepalive = counting  # type: ignore[method-assign]
    try:
        ws = loop.run_until_complete(main())
    finally:
        WebSocket._keepalive = original  # type: ignore[method-assign]
    assert ws.open  # no pong ever came, but the deadline is not reached (or there is none)
    assert calls <= 0.3 / interval + 2


def test_idle_connections_are_pinged_together(loop: asyncio.AbstractEventLoop) -> None:
    """Keepalive deadlines are rounded up to a multiple of KEEPALIVE_TICK: 50 connections
    opened one after the other are pinged in a pass of the loop per tick, not one each."""

    async def main() -> tuple[set[float], float]:
        engine = Engine(Options(ping_interval=20, ping_timeout=20), Echo())
        opened, began = [], loop.time()
        for _ in range(50):
            opened.append(connect(engine, "/")[0])
            await asyncio.sleep(0.01)
        timers = [ws._timer for ws in opened]
        return {t.when() for t in timers if isinstance(t, asyncio.TimerHandle)}, loop.time() - began

    deadlines, took = loop.run_until_complete(main())
    tick = connection.KEEPALIVE_TICK
    assert len(deadlines) <= took / tick + 2, (sorted(deadlines), took)
    for due in deadlines:
        assert abs(due / tick - round(due / tick)) < 1e-6, due


def test_the_next_ping_is_due_an_interval_after_the_last_was_due(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Not an interval after the ping ran: that is always a little after its tick, so
    rounding up would make every interval a tick longer (a ping every 0.85 s here)."""

    pinged = asyncio.Event()
    original = WebSocket._keepalive

    def keepalive(self: WebSocket) -> None:
        original(self)
        pinged.set()

    async def main() -> tuple[float, float]:
        engine = Engine(Options(ping_interval=0.8, ping_timeout=0.8), Echo())  # tick: 0.05 s
        ws, _ = connect(engine, "/")
        timer = ws._timer
        assert timer is not None
        due = timer.when()
        await pinged.wait()  # the timer ran, a moment after it was due
        assert ws._ping is not None
        turn(engine, ws, frame(OP_PONG, ws._ping))
        assert ws._timer is not None
        return due, ws._timer.when()

    WebSocket._keepalive = keepalive  # type: ignore[method-assign]
    try:
        due, next_due = loop.run_until_complete(main())
    finally:
        WebSocket._keepalive = original  # type: ignore[method-assign]
    assert next_due == pytest.approx(due + 0.8, abs=1e-6)


def test_close_reason_is_cut_at_a_character_boundary() -> None:
    payload = frames.close_payload(1001, "é" * 100)  # 200 bytes of UTF-8: too long
    assert len(payload) <= 125
    assert struct.unpack("!H", payload[:2]) == (1001,)
    payload[2:].decode()  # valid UTF-8 (5.5.1), not half a character


def test_ping_payloads_never_overflow(loop: asyncio.AbstractEventLoop) -> None:
    engine = make_engine(loop, Echo())
    engine._pings = iter([2**32 + 5])  # type: ignore[assignment]
    assert engine.next_ping() == (5).to_bytes(4, "big")


def test_the_last_member_leaving_while_behind_forgets_its_channel_once(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving while behind releases the channel, which forgets it when empty; the leave
    then forgot it again (a KeyError, logged as "application failed on close")."""

    async def main() -> Relay:
        relay = Relay(MemoryBroker(), write_limit=1000, max_size=10_000, slow_consumer_timeout=60)
        engine = Engine(Options(write_limit=1000, max_size=10_000, ping_interval=0), relay)
        receiver, _ = connect(engine)
        publisher, _ = connect(engine)
        turn(engine, publisher, frame(OP_BINARY, bytes(1500)))  # the receiver is behind
        assert receiver.blocked
        publisher.connection_lost(None)
        receiver.connection_lost(None)  # the last member, still behind
        await asyncio.sleep(0)
        return relay

    with caplog.at_level(logging.DEBUG, logger="wsechod"):
        relay = loop.run_until_complete(main())
    assert relay.channels == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


class Failing(Echo):
    """An application with a bug a client can trigger at every connection."""

    def opened(self, conn: Connection) -> None:
        raise RuntimeError("bug on open")

    def closed(self, conn: Connection) -> None:
        raise RuntimeError("bug on close")


def test_application_failures_are_rate_limited(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """One line (with its traceback) per second per kind, with a count, not one per
    connection: clients can trigger a bug as often as they like."""

    async def main() -> None:
        engine = Engine(Options(ping_interval=0), Failing())
        for _ in range(100):
            ws, _ = connect(engine, "/")
            ws.connection_lost(None)

    with caplog.at_level(logging.ERROR, logger="wsechod"):
        loop.run_until_complete(main())
    events = [r.getMessage() for r in caplog.records]
    assert events.count("application failed on open") == 1
    assert events.count("application failed on close") == 1


def test_failing_callbacks_on_our_loop_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An application's timer or wake-up that raises goes to the loop's exception
    handler; ours logs one line (with the traceback) per second for one bug, not one per
    failure, although uvloop's message names a different object each time."""

    class Timer:
        def fire(self) -> None:
            raise RuntimeError("bug in a timer")

    async def main() -> None:
        for _ in range(100):
            asyncio.get_running_loop().call_soon(Timer().fire)
        await asyncio.sleep(0)

    loop = uvloop.new_event_loop()
    loop.set_exception_handler(run._callback_failed)
    try:
        with caplog.at_level(logging.ERROR, logger="wsechod"):
            loop.run_until_complete(main())
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records] == ["callback failed"]
    assert caplog.records[0].exc_info is not None


def test_the_memory_budget_never_leaves_connections_paused_for_good(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Four clients each hold 30 kB of a 60 kB frame under a 100 kB budget: paused, then
    the heaviest are closed until the rest is back under the mark where reading resumes
    (closing only down to the limit left three paused, forever, holding what they could
    never finish)."""

    async def main() -> tuple[list[WebSocket], list[Transport]]:
        engine = Engine(Options(memory_limit=100_000, max_size=100_000, ping_interval=0), Echo())
        pairs = [connect(engine, "/") for _ in range(4)]
        engine.budget.start()
        for ws, _ in pairs:
            turn(engine, ws, frame(OP_BINARY, bytes(60_000))[:30_014])
        for _ in range(100):  # the budget's own timer: a check, then a grace, then closes
            await asyncio.sleep(0.05)
            if not engine.budget.paused and engine.budget.closed:
                break
        engine.budget.stop()
        return [ws for ws, _ in pairs], [t for _, t in pairs]

    conns, transports = loop.run_until_complete(main())
    closed = [ws for ws in conns if ws.code_sent == 1013]
    assert len(closed) == 2, [ws.code_sent for ws in conns]
    assert all(t.reading for ws, t in zip(conns, transports, strict=True) if ws not in closed)


def test_a_relayed_message_is_compressed_once_for_every_compressing_member(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not once per member: a thousand members were a thousand compressions of every
    message, and a 1 MiB message among 40 held the loop for seconds."""
    calls: list[int] = []

    def counting(data: bytes, bits: int) -> bytes:
        calls.append(bits)
        return compress_whole(data, bits)

    monkeypatch.setattr(connection, "compress_whole", counting)

    async def main() -> None:
        relay = Relay(MemoryBroker())
        engine = Engine(Options(ping_interval=0, write_limit=2**30), relay)
        offers = [PerMessageDeflate(False, False, 15, 15)] * 40 + [
            PerMessageDeflate(False, False, 15, 10)  # a smaller window for our messages
        ]
        for negotiated in offers:
            t = Transport()
            t.high = 2**30
            ws = WebSocket(engine, t, "/room", "peer", Deflate(negotiated))  # type: ignore[arg-type]
            t.protocol = ws
            engine.opened(ws)
        publisher, _ = connect(engine)
        turn(engine, publisher, frame(OP_BINARY, bytes(1000)))

    loop.run_until_complete(main())
    assert sorted(calls) == [10, 15]  # once per window size
