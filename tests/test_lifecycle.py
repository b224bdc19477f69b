"""Lifecycle with real signals: drain under load, second signal, stubborn clients, health."""

import asyncio
import contextlib
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from tests import rawws
from tests.conftest import Daemon, peer_port, run_cli
from tests.test_echo import http_get

CLIENTS = 200
WINDOW = 8  # messages a client may have sent but not yet seen echoed


@dataclass
class Client:
    port: int = 0  # the client's own port: the server logs it as the peer
    attempted: list[str] = field(default_factory=list)
    echoed: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    warm: asyncio.Event = field(default_factory=asyncio.Event)  # had 5 round trips


async def chatter(ws: ClientConnection, me: Client, name: str) -> None:
    """Send numbered messages continuously (at most WINDOW unanswered) until closed."""
    window = asyncio.Semaphore(WINDOW)
    me.port = ws.local_address[1]

    async def send_forever() -> None:
        n = 0
        while True:
            await window.acquire()
            if ws.protocol.state is not State.OPEN:
                return  # send() would not write it
            message = f"{name}:{n}"
            me.attempted.append(message)  # written by send() before its first await
            await ws.send(message)
            n += 1

    sender = asyncio.create_task(send_forever())
    try:
        async for message in ws:
            assert isinstance(message, str)
            me.echoed.append(message)
            window.release()
            if len(me.echoed) == 5:
                me.warm.set()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await sender
    assert ws.protocol.close_rcvd is not None
    me.close_code = ws.protocol.close_rcvd.code
    me.close_reason = ws.protocol.close_rcvd.reason


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_under_load_closes_every_client_with_1001(
    start: Callable[..., Daemon], sig: signal.Signals
) -> None:
    drain_timeout = 5.0
    daemon = start("--drain-timeout", str(drain_timeout), "--log-level", "debug")
    clients = [Client() for _ in range(CLIENTS)]

    async def main() -> tuple[float, BaseException | int]:
        conns = [await connect(daemon.url, close_timeout=10) for _ in clients]
        tasks = [
            asyncio.create_task(chatter(ws, me, str(i)))
            for i, (ws, me) in enumerate(zip(conns, clients, strict=True))
        ]
        # Under load: every client has had several round trips, then a second of traffic.
        await asyncio.wait_for(asyncio.gather(*(c.warm.wait() for c in clients)), 20)
        await asyncio.sleep(1.0)
        sent_at = daemon.signal(sig)
        await asyncio.to_thread(daemon.wait_for, "stop requested")
        # A newcomer is refused with HTTP 503 while the drain runs (or finds the port
        # closed once it has ended).
        refused: BaseException | int
        try:
            async with connect(daemon.url, open_timeout=5) as late:
                refused = late.protocol.state.value
        except (InvalidStatus, OSError) as exc:
            refused = exc
        await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout + 5)
        return sent_at, refused

    sent_at, refused = asyncio.run(main())
    rc = daemon.wait(drain_timeout + 2)
    elapsed = time.monotonic() - sent_at

    assert rc == 0, daemon.log
    assert elapsed < drain_timeout + 2
    if isinstance(refused, InvalidStatus):
        assert refused.response.status_code == 503
    else:
        assert isinstance(refused, ConnectionRefusedError), refused
    tallies = {peer_port(e): e for e in daemon.events if e["event"] == "connection closed"}
    for me in clients:
        assert (me.close_code, me.close_reason) == (1001, "server shutting down")
        # Echoes come back intact and in order.
        assert me.echoed == me.attempted[: len(me.echoed)]
        # Nothing vanished: the server took in every message the client wrote, and every
        # echo it wrote reached the client before the close frame. What it could not
        # answer had arrived after its close frame had gone out.
        server = tallies[me.port]
        assert (server["received"], server["sent"]) == (len(me.attempted), len(me.echoed))
        assert (server["code_sent"], server["code_received"]) == (1001, 1001)
    stop = daemon.wait_for("stop requested")
    assert (stop["reason"], stop["connections"]) == (sig.name, CLIENTS)
    drained = daemon.wait_for("drained")
    assert (drained["connections"], drained["force_closed"]) == (CLIENTS, 0)
    daemon.wait_for("stopped")
    assert "Traceback" not in daemon.log


def stubborn_client(port: int) -> socket.socket:
    """A connection that will never answer a close frame (nor read anything after it)."""
    sock = rawws.connect(port)
    rawws.send_frame(sock, rawws.OP_TEXT, b"hi")
    assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"hi")
    return sock


def test_health_turns_503_during_drain_and_second_signal_stops_at_once(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--drain-timeout", "60", "--close-timeout", "60")
    assert http_get(daemon.port, "/healthz")[:2] == (200, "ok\n")
    with stubborn_client(daemon.port) as sock:
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("stop requested")
        assert rawws.read_close(sock) == (1001, "server shutting down")
        # The stubborn client holds the drain open: the port answers, but only with 503.
        assert http_get(daemon.port, "/healthz")[:2] == (503, "draining\n")

        async def upgrade() -> int:
            with pytest.raises(InvalidStatus) as info:
                async with connect(daemon.url):
                    pass
            return info.value.response.status_code

        assert asyncio.run(upgrade()) == 503
        assert daemon.proc.poll() is None  # still draining: 60 s allowed

        second = daemon.signal(signal.SIGTERM)
        rc = daemon.wait(5)
        assert time.monotonic() - second < 2
    assert rc == 0
    assert daemon.wait_for("stopping now")["reason"] == "SIGTERM"
    assert daemon.wait_for("drained")["force_closed"] == 1
    daemon.wait_for("stopped")


@pytest.mark.parametrize("drain_timeout", [0.0, 2.0])
def test_client_ignoring_close_cannot_hold_exit_past_drain_timeout(
    start: Callable[..., Daemon], drain_timeout: float
) -> None:
    # close_timeout is longer than the drain: only the drain deadline can end this.
    daemon = start("--drain-timeout", str(drain_timeout), "--close-timeout", "60")
    with stubborn_client(daemon.port), stubborn_client(daemon.port):
        sent_at = daemon.signal(signal.SIGTERM)
        rc = daemon.wait(drain_timeout + 2)
        elapsed = time.monotonic() - sent_at
    assert rc == 0
    assert drain_timeout <= elapsed < drain_timeout + 2
    drained = daemon.wait_for("drained")
    assert (drained["connections"], drained["force_closed"]) == (2, 2)


def test_a_client_ignoring_the_drain_is_cut_at_close_timeout(
    start: Callable[..., Daemon],
) -> None:
    """In a drain, a connection's close deadline is the drain's own timer, one for all
    (not one per connection): a client that never answers is cut at close_timeout (1 s,
    the drain allows 60), while one that answers completes the closing handshake."""
    daemon = start("--drain-timeout", "60", "--close-timeout", "1")
    with stubborn_client(daemon.port) as stubborn, stubborn_client(daemon.port) as polite:
        sent_at = daemon.signal(signal.SIGTERM)
        assert rawws.read_close(polite) == (1001, "server shutting down")
        rawws.send_frame(polite, rawws.OP_CLOSE, rawws.close_payload(1001))
        assert rawws.until_eof(polite) == b""
        assert rawws.read_close(stubborn) == (1001, "server shutting down")
        with contextlib.suppress(ConnectionResetError):
            assert rawws.until_eof(stubborn) == b""  # cut: a reset, or end of file
        assert daemon.wait(10) == 0
        assert 1 <= time.monotonic() - sent_at < 10
    drained = daemon.wait_for("drained")
    assert (drained["connections"], drained["force_closed"]) == (2, 0)


def test_silent_tcp_client_cannot_hold_exit(start: Callable[..., Daemon]) -> None:
    # A connection that never sends its handshake is not a WebSocket client yet; it must
    # not hold the exit until open_timeout (60 s here).
    daemon = start("--drain-timeout", "0", "--open-timeout", "60")
    with socket.create_connection(("127.0.0.1", daemon.port)):
        sent_at = daemon.signal(signal.SIGTERM)
        assert daemon.wait(5) == 0
        assert time.monotonic() - sent_at < 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_start_up_is_a_graceful_stop(
    sig: signal.Signals,
) -> None:
    daemon = Daemon()  # not .ready(): the signal goes in before the server listens
    try:
        daemon.wait_for("starting")
        daemon.signal(sig)
        assert daemon.wait(5) == 0, daemon.log
        daemon.wait_for("stopped")
        assert "Traceback" not in daemon.log
    finally:
        daemon.kill()


def test_signals_after_the_drain_cannot_kill_the_exit(start: Callable[..., Daemon]) -> None:
    daemon = start("--drain-timeout", "60", "--close-timeout", "60")
    with stubborn_client(daemon.port):
        daemon.signal(signal.SIGINT)
        daemon.wait_for("stop requested")
        for _ in range(5):  # an impatient operator: the second forces, the rest must not hurt
            daemon.signal(signal.SIGINT)
        assert daemon.wait(5) == 0, daemon.log
    daemon.wait_for("stopped")
    assert "Traceback" not in daemon.log


def test_idle_server_stops_on_sigint_at_once(start: Callable[..., Daemon]) -> None:
    daemon = start()
    sent_at = daemon.signal(signal.SIGINT)
    assert daemon.wait(5) == 0
    assert time.monotonic() - sent_at < 2
    assert daemon.wait_for("drained")["connections"] == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_reload_signals_do_not_stop_the_server(
    start: Callable[..., Daemon], sig: signal.Signals
) -> None:
    """SIGUSR1 is what logrotate rules written for nginx send: it used to kill wsechod."""
    daemon = start()
    daemon.signal(sig)
    reloaded = daemon.wait_for("settings reloaded: nothing changed")
    assert reloaded["signal"] == sig.name
    assert http_get(daemon.port, "/healthz")[0] == 200
    assert daemon.proc.poll() is None


def test_lifecycle_events_are_logged_in_order(start: Callable[..., Daemon]) -> None:
    daemon = start()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(5) == 0
    names = [e["event"] for e in daemon.events if not e["event"].startswith("open files limit")]
    assert names == ["starting", "listening", "stop requested", "drained", "stopped"]
    assert daemon.wait_for("listening")["addresses"] == [f"127.0.0.1:{daemon.port}"]


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("--config", "", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == (
        f"wsechod: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_unassignable_address_is_one_line_and_exit_1() -> None:
    # 192.0.2.1 (TEST-NET-1) is never a local address: bind() fails, nothing is sent.
    result = run_cli("--config", "", "--host", "192.0.2.1", "--port", "0")
    assert result.returncode == 1
    assert "cannot listen on 192.0.2.1:0: Cannot assign requested address" in result.stderr
    assert result.stderr.count("\n") == 1


def test_open_files_soft_limit_is_raised_to_hard(start: Callable[..., Daemon]) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    daemon = start(prefix=("prlimit", "--nofile=256:", "--"))
    raised = daemon.wait_for("open files limit raised")
    assert (raised["previous"], raised["limit"]) == (256, hard)
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    assert int(limits.split("Max open files")[1].split()[0]) == hard


def test_warns_when_open_files_limit_is_below_max_connections(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--max-connections", "1000", prefix=("prlimit", "--nofile=512:512", "--"))
    warning = daemon.wait_for("open files limit is below max_connections")
    assert (warning["limit"], warning["max_connections"]) == (512, 1000)
    assert warning["level"] == "warning"


class IdleClient(asyncio.Protocol):
    """A connection that sends nothing of its own: it answers the server's pings (setting
    up 10,000 of them on a busy machine takes longer than the keepalive's interval) and
    its close frame, whose code it records."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.code: int | None = None
        self.gone = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(rawws.handshake_request(self.port))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            head, sep, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            self.upgraded.set_result(b" 101 " in head.split(b"\r\n", 1)[0])
        # Control frames only (payload under 126 bytes, unmasked from a server).
        while len(self.buffer) >= 2 and len(self.buffer) >= 2 + (self.buffer[1] & 0x7F):
            opcode, size = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            payload, self.buffer = self.buffer[2 : 2 + size], self.buffer[2 + size :]
            if opcode == rawws.OP_PING:
                self.transport.write(rawws.frame(rawws.OP_PONG, payload))
            elif opcode == rawws.OP_CLOSE:
                self.code = int.from_bytes(payload[:2], "big")
                self.transport.write(rawws.frame(rawws.OP_CLOSE, payload[:2]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


@pytest.mark.timeout(180)
def test_ten_thousand_idle_connections_all_get_1001_and_the_process_exits_0(
    start: Callable[..., Daemon],
) -> None:
    """The time this takes goes to the benchmark; here: everyone is told, nobody is cut."""
    count = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 100:
        pytest.skip(f"the open files limit ({hard}) is below {count} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = start("--max-connections", "0", "--drain-timeout", "60")

    async def main() -> list[IdleClient]:
        loop = asyncio.get_running_loop()
        clients: list[IdleClient] = []
        for _ in range(count):
            _, client = await loop.create_connection(
                lambda: IdleClient(daemon.port), "127.0.0.1", daemon.port
            )
            clients.append(client)
            if len(clients) % 500 == 0:  # keep the accept backlog short
                assert all(await asyncio.gather(*(c.upgraded for c in clients[-500:])))
        assert all(await asyncio.gather(*(c.upgraded for c in clients)))
        daemon.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(c.gone for c in clients)), 120)
        return clients

    try:
        clients = asyncio.run(main())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert daemon.wait(30) == 0
    assert [c.code for c in clients] == [1001] * count
    drained = daemon.wait_for("drained")
    assert (drained["connections"], drained["force_closed"]) == (count, 0)
    print(f"drain of {count} idle connections: {drained['duration']} s (server's own figure)")
