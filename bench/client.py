"""The load client: picows (a Cython WebSocket parser with callbacks) on uvloop.

No task and no coroutine per message: each echo arrives as an ``on_ws_frame`` callback that
records the round trip and sends the next message at once. The client must cost much less
per message than the servers under test; its own CPU time is measured so the report can say
when it was the bottleneck.
"""

import asyncio
import contextlib
import os
import resource
import signal
import ssl
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HANDSHAKES_IN_FLIGHT = 50  # below the servers' listen backlog (100 in asyncio)
DATA = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)


def client_cpu() -> float:
    """This process's CPU seconds (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Client(WSListener):
    """Common part: remember the transport, answer the server's close, note its code."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self.gone = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)

    def on_close(self, transport: WSTransport, frame: WSFrame) -> None:
        code = frame.get_close_code()
        self.close_code = int(code.value) if isinstance(code, WSCloseCode) else int(code)
        if not transport.is_close_frame_sent:
            transport.send_close(code)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True


C = TypeVar("C", bound=Client)


async def connect_many(
    port: int,
    n: int,
    make: Callable[[], C],
    path: str = "/",
    tokens: Iterator[str] | None = None,
    *,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> list[C]:
    """Open ``n`` connections, keeping a bounded number of handshakes in flight; with
    ``tokens``, each with the next one (the ``token`` query parameter); with ``headers``
    in each request; over TLS with ``tls``."""
    base = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}{path}"
    clients: list[C] = []
    failures: list[BaseException] = []
    slots = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)

    async def one(url: str) -> None:
        try:
            _, listener = await ws_connect(
                make,
                url,
                websocket_handshake_timeout=30,
                read_buffer_init_size=1024,
                use_aiofastnet=False,  # uvloop's own transports: cheaper here (measured)
                extra_headers=headers,
                ssl_context=tls,
            )
            clients.append(cast(C, listener))
        except Exception as exc:
            failures.append(exc)
        finally:
            slots.release()

    tasks = set()
    try:
        for _ in range(n):
            await slots.acquire()
            if failures:
                break
            url = base if tokens is None else f"{base}?token={next(tokens)}"
            task = asyncio.ensure_future(one(url))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        if failures:
            raise ConnectionError(
                f"{len(failures)} handshake(s) failed after {len(clients)} connections: "
                f"{failures[0]!r}"
            )
    except BaseException:
        for task in tasks:
            task.cancel()
        abort_all(clients)
        raise
    return clients


def abort_all(clients: Iterable[Client]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.disconnect(graceful=False)


async def all_gone(clients: Iterable[Client], within: float) -> None:
    """Wait until every client is disconnected, ``within`` seconds at most."""
    waits = [
        asyncio.ensure_future(c.transport.wait_disconnected())
        for c in clients
        if c.transport is not None and not c.gone
    ]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=within)
        for wait in pending:
            wait.cancel()


async def close_all(clients: list[C], within: float = 5.0) -> None:
    """Close 1000 from the client side; cut whatever has not finished ``within`` seconds."""
    for c in clients:
        if c.transport is not None and not c.gone and not c.transport.is_close_frame_sent:
            c.transport.send_close(WSCloseCode.OK)
    await all_gone(clients, within)
    abort_all(c for c in clients if not c.gone)


# Echo: ping-pong with latency -------------------------------------------------------------


@dataclass
class EchoRun:
    payload: bytes
    running: bool = False
    recording: bool = False
    count: int = 0
    in_flight: int = 0
    samples: list[float] = field(default_factory=list)
    quiet: asyncio.Event = field(default_factory=asyncio.Event)  # stopped, nothing in flight


class EchoClient(Client):
    def __init__(self, run: EchoRun) -> None:
        super().__init__()
        self.run = run
        self.sent_at: deque[float] = deque()  # of the messages in flight, in order

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in DATA:
            if not frame.fin:
                return
            now = time.perf_counter()
            run = self.run
            run.count += 1
            sent_at = self.sent_at
            if run.recording:
                run.samples.append(now - sent_at.popleft())
            else:
                sent_at.popleft()
            if run.running:
                sent_at.append(now)
                transport.send(WSMsgType.BINARY, run.payload)
            else:
                run.in_flight -= 1
                if run.in_flight == 0:
                    run.quiet.set()
        elif frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)

    def start(self, depth: int) -> None:
        """``depth`` messages in flight from now on (1: ping-pong; more: pipelining)."""
        assert self.transport is not None
        for _ in range(depth):
            self.run.in_flight += 1
            self.sent_at.append(time.perf_counter())
            self.transport.send(WSMsgType.BINARY, self.run.payload)


@dataclass
class Window:
    """What happened during a measured window (the client's view and the server's CPU)."""

    seconds: float
    events: int
    server_cpu: float
    client_cpu: float


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class EchoResult:
    window: Window
    p50: float
    p99: float


async def echo(
    port: int,
    *,
    connections: int,
    size: int,
    warmup: float,
    seconds: float,
    server_cpu: Callable[[], float],
    tokens: Iterator[str] | None = None,
    depth: int = 1,
    tls: ssl.SSLContext | None = None,
) -> EchoResult:
    """Round trips with ``depth`` messages in flight per connection."""
    run = EchoRun(os.urandom(size))
    clients = await connect_many(port, connections, lambda: EchoClient(run), "/", tokens, tls=tls)
    try:
        run.running = True
        for c in clients:
            c.start(depth)
        await asyncio.sleep(warmup)
        t0, n0, s0, c0 = time.perf_counter(), run.count, server_cpu(), client_cpu()
        run.recording = True
        await asyncio.sleep(seconds)
        run.recording = False
        t1, n1, s1, c1 = time.perf_counter(), run.count, server_cpu(), client_cpu()
        run.running = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.quiet.wait(), 5)
        if any(c.gone for c in clients):
            raise ConnectionError(f"{sum(c.gone for c in clients)} connections lost")
    finally:
        await close_all(clients)
    samples = sorted(run.samples)
    return EchoResult(
        Window(t1 - t0, n1 - n0, s1 - s0, c1 - c0),
        percentile(samples, 0.50),
        percentile(samples, 0.99),
    )


# Idle connections: memory, then drain on SIGTERM -------------------------------------------


@dataclass
class IdleResult:
    connections: int
    kib_per_connection: float
    drain_seconds: float
    closed_1001: int
    closed_other: int
    cut: int


async def wait_exit(proc: "subprocess.Popen[str]", within: float) -> bool:
    """Wait until our child ``proc`` has exited; True if it did ``within`` seconds."""
    try:
        fd = os.pidfd_open(proc.pid)  # readable once the process has exited (Linux 5.3)
    except (AttributeError, OSError):
        try:
            await asyncio.to_thread(proc.wait, within)
            return True
        except subprocess.TimeoutExpired:
            return False
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(exited, within)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def idle_and_drain(
    port: int,
    *,
    proc: "subprocess.Popen[str]",
    connections: int,
    rss: Callable[[], int],
    settle: float = 0.5,
) -> IdleResult:
    await asyncio.sleep(0.3)
    rss0 = rss()
    clients = await connect_many(port, connections, Client)
    try:
        await asyncio.sleep(settle)
        rss1 = rss()
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        if not await wait_exit(proc, 60):
            raise TimeoutError("the server did not exit within 60 s of SIGTERM")
        drain = time.perf_counter() - t0
        await all_gone(clients, 5)
    finally:
        abort_all(c for c in clients if not c.gone)
    closed_1001 = sum(c.close_code == 1001 for c in clients)
    closed_other = sum(c.close_code not in (None, 1001) for c in clients)
    return IdleResult(
        connections,
        (rss1 - rss0) / connections / 1024,
        drain,
        closed_1001,
        closed_other,
        sum(c.close_code is None for c in clients),
    )


# Fan-out: one publisher, many subscribers on one channel -----------------------------------


@dataclass
class FanRun:
    payload: bytes
    subscribers: int
    batch: int
    window_batches: int
    publishers: list[WSTransport] = field(default_factory=list)
    running: bool = False
    deliveries: int = 0
    sent_batches: int = 0
    done_batches: int = 0
    finished: dict[int, int] = field(default_factory=dict)
    quiet: asyncio.Event = field(default_factory=asyncio.Event)  # stopped, all delivered
    sent_at: dict[int, float] = field(default_factory=dict)  # by batch
    latencies: list[float] = field(default_factory=list)  # batch sent -> all received
    recording: bool = False

    def publish(self) -> None:
        """Keep at most ``window_batches`` batches ahead of the slowest subscriber; a
        batch's messages from the publishers in turn."""
        publishers = self.publishers
        while self.running and self.sent_batches - self.done_batches < self.window_batches:
            self.sent_at[self.sent_batches + 1] = time.perf_counter()
            for i in range(self.batch):
                publishers[i % len(publishers)].send(WSMsgType.BINARY, self.payload)
            self.sent_batches += 1

    def batch_received(self, index: int) -> None:
        # Each subscriber receives in order, so batches complete for all in order too.
        left = self.finished.get(index, self.subscribers) - 1
        if left:
            self.finished[index] = left
        else:
            self.finished.pop(index, None)
            sent = self.sent_at.pop(index, None)
            if self.recording and sent is not None:
                self.latencies.append(time.perf_counter() - sent)
            self.done_batches += 1
            self.publish()
            if not self.running and self.done_batches == self.sent_batches:
                self.quiet.set()


class Subscriber(Client):
    def __init__(self, run: FanRun) -> None:
        super().__init__()
        self.run = run
        self.count = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in DATA:
            if frame.fin:
                self.count += 1
                run = self.run
                run.deliveries += 1
                if self.count % run.batch == 0:
                    run.batch_received(self.count // run.batch)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)


def text_payload(size: int) -> bytes:
    """JSON-like text of ``size`` bytes that deflate shrinks a few times, as chat does."""
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    parts: list[str] = []
    n = 0
    while n < size:
        text = f"{words[n % 8]} {words[len(parts) % 8]}"
        part = f'{{"id":{len(parts)},"user":"u{n % 97}","text":"{text}"}},'
        parts.append(part)
        n += len(part)
    return "".join(parts)[:size].encode()


async def fan_out(
    port: int,
    *,
    subscribers: int,
    size: int,
    warmup: float,
    seconds: float,
    server_cpu: Callable[[], float],
    window: int = 256,
    batch: int = 16,
    tokens: Iterator[str] | None = None,
    publisher_port: int | None = None,
    deflate: bool = False,
    publishers: int = 1,
    tls: ssl.SSLContext | None = None,
) -> tuple[Window, float]:
    """Deliveries and the 99th percentile of a batch's latency (from its first message
    sent to its last received by every subscriber); the publisher on ``publisher_port``
    (another instance) if given. With ``deflate`` the subscribers offer permessage-deflate
    and count the compressed messages without inflating them (the server's cost is the
    figure), and the payload is text that deflate shrinks, not random bytes. With several
    ``publishers``, each batch's messages come from them in turn (a subscriber then gets
    messages from several connections in one turn of the server's loop)."""
    payload = text_payload(size) if deflate else os.urandom(size)
    run = FanRun(payload, subscribers, batch, max(1, window // batch))
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate"} if deflate else None
    subs = await connect_many(
        port, subscribers, lambda: Subscriber(run), "/bench", tokens, headers=offer, tls=tls
    )
    clients: list[Client] = list(subs)
    try:
        clients += await connect_many(
            publisher_port or port, publishers, Client, "/bench", tokens, tls=tls
        )
        run.publishers = [c.transport for c in clients[-publishers:] if c.transport is not None]
        publisher = run.publishers[0]
        # Joining may finish after the handshake: probe until every subscriber hears.
        deadline = time.monotonic() + 15
        while any(s.count == 0 for s in subs):
            if time.monotonic() > deadline:
                missing = sum(s.count == 0 for s in subs)
                raise TimeoutError(f"{missing} subscribers never received a message")
            publisher.send(WSMsgType.BINARY, run.payload)
            await asyncio.sleep(0.05)
        last = -1
        while last != run.deliveries:  # let the probes land
            last = run.deliveries
            await asyncio.sleep(0.1)
        for s in subs:
            s.count = 0
        run.deliveries = 0
        run.running = True
        run.publish()
        await asyncio.sleep(warmup)
        t0, n0, s0, c0 = time.perf_counter(), run.deliveries, server_cpu(), client_cpu()
        run.recording = True
        end = t0 + seconds
        while (now := time.perf_counter()) < end:
            before, pause = run.deliveries, min(1.0, end - now)
            await asyncio.sleep(pause)
            if run.deliveries == before and pause >= 0.5:
                raise TimeoutError("no delivery for 0.5 s: messages lost or dropped?")
        run.recording = False
        t1, n1, s1, c1 = time.perf_counter(), run.deliveries, server_cpu(), client_cpu()
        run.running = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.quiet.wait(), 5)
    finally:
        await close_all(clients)
    p99 = percentile(sorted(run.latencies), 0.99)
    return Window(t1 - t0, n1 - n0, s1 - s0, c1 - c0), p99


# Opening handshakes ----------------------------------------------------------------------


async def handshakes(
    port: int,
    *,
    connections: int,
    server_cpu: Callable[[], float],
    tokens: Iterator[str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Window:
    """Open ``connections`` (HANDSHAKES_IN_FLIGHT at a time), measured, then close them."""
    t0, s0, c0 = time.perf_counter(), server_cpu(), client_cpu()
    clients = await connect_many(port, connections, Client, "/", tokens, tls=tls)
    t1, s1, c1 = time.perf_counter(), server_cpu(), client_cpu()
    await close_all(clients)
    return Window(t1 - t0, len(clients), s1 - s0, c1 - c0)


# Resume: a wsechod.v1 client catching up with a channel's history ------------------------


class Catcher(Client):
    """A wsechod.v1 client: counts the ``m`` lines, notes the epoch and the ``p``/``l``
    line that ends a catch-up."""

    def __init__(self) -> None:
        super().__init__()
        self.messages = 0
        self.epoch = ""
        self.ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in DATA:
            super().on_ws_frame(transport, frame)
            return
        data = frame.get_payload_as_bytes()
        kind = data[:1]
        if kind == b"m":
            self.messages += 1
            if not self.epoch:
                self.epoch = data.split(b"\n", 1)[0].split(b" ")[2].decode()
        elif kind in (b"p", b"l") and self.messages and not self.ended.done():
            self.ended.set_result(data)


@dataclass
class ResumeResult:
    messages: int
    seconds: float
    server_cpu: float
    rss_kib: float  # the server's peak growth while it sent them


async def resume(
    port: int,
    *,
    messages: int,
    size: int,
    server_cpu: Callable[[], float],
    rss: Callable[[], int],
) -> ResumeResult:
    """Publish ``messages`` to a channel with history (a v1 watcher sees them all land),
    then resume a new v1 client from offset 0: the time, server CPU and memory it takes."""
    v1 = {"Sec-WebSocket-Protocol": "wsechod.v1"}

    async def one(make: Callable[[], C], path: str) -> C:
        _, listener = await ws_connect(
            make, f"ws://127.0.0.1:{port}{path}", extra_headers=v1, use_aiofastnet=False
        )
        return cast(C, listener)

    watcher = await one(Catcher, "/resume")
    (publisher,) = await connect_many(port, 1, Client, "/resume")
    clients: list[Client] = [watcher, publisher]
    try:
        assert publisher.transport is not None
        payload = os.urandom(size)
        for n in range(messages):
            publisher.transport.send(WSMsgType.BINARY, payload)
            if n % 256 == 255:
                await asyncio.sleep(0)  # let the server read
        deadline = time.monotonic() + 60
        while watcher.messages < messages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{watcher.messages} of {messages} messages landed")
            await asyncio.sleep(0.01)
        peak, base = 0, rss()
        t0, s0 = time.perf_counter(), server_cpu()
        catcher = await one(Catcher, f"/resume?since=0&epoch={watcher.epoch}")
        clients.append(catcher)
        while not catcher.ended.done():
            if time.monotonic() > deadline + 60:
                raise TimeoutError(f"{catcher.messages} of {messages} messages replayed")
            peak = max(peak, rss())
            await asyncio.wait([catcher.ended], timeout=0.005)
        t1, s1 = time.perf_counter(), server_cpu()
        ended = catcher.ended.result()
        if not ended.startswith(b"p ") or catcher.messages != messages:
            raise AssertionError(f"{catcher.messages} replayed, then {ended[:40]!r}")
    finally:
        await close_all(clients)
    return ResumeResult(messages, t1 - t0, s1 - s0, max(0, peak - base) / 1024)
