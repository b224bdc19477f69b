"""Regression tests for what hostile testing broke: each failed on the engine as first
written (deflate final blocks, one client holding the loop, relay verdicts and logs during
slow consumption and drains, Host headers, odd request heads)."""

import base64
import contextlib
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from tests import rawws
from tests.conftest import Daemon, RssPeak
from tests.rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, frame
from tests.test_protocol import of_port

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def deflate_connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A raw client that offers permessage-deflate (server window 12 bits, ours 15)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert b" 101 " in head and b"permessage-deflate" in head, head
    return sock


def read_raw(sock: socket.socket) -> tuple[int, bool, bool, bytes]:
    """opcode, fin, rsv1, payload."""
    first, second = rawws._read_exact(sock, 2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", rawws._read_exact(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", rawws._read_exact(sock, 8))
    return first & 0x0F, bool(first & 0x80), bool(first & 0x40), rawws._read_exact(sock, n)


def compressed(payload: bytes, wbits: int = 15, final: bool = False) -> bytes:
    """One message's payload as permessage-deflate sends it (7.2.1), or ended by a final
    block (BFINAL=1), which 7.2.1 allows too ("MAY use ... BFINAL set to 1", 7.2.3.4)."""
    encoder = zlib.compressobj(wbits=-wbits)
    if final:
        return encoder.compress(payload) + encoder.flush(zlib.Z_FINISH)
    return (encoder.compress(payload) + encoder.flush(zlib.Z_SYNC_FLUSH))[:-4]


def drain_in_background(sock: socket.socket) -> None:
    def drain() -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 20):
                pass

    threading.Thread(target=drain, daemon=True).start()


@contextlib.contextmanager
def flooding(sock: socket.socket, data: bytes) -> Iterator[None]:
    """``sock`` sends ``data`` over and over (and its echoes are read and discarded)."""
    stop = threading.Event()

    def flood() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(data)

    drain_in_background(sock)
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        sock.close()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worst_wait(daemon: Daemon, round_trips: int) -> float:
    """How much CPU the server spends on others while a well-behaved client waits for an
    echo, at worst over ``round_trips``: fair, about one turn of the flooding client (a
    few milliseconds); unfair, its whole read (seconds). Server CPU, not wall time: on a
    loaded machine waiting takes longer, the server's work does not grow."""
    worst = 0.0
    with rawws.connect(daemon.port, timeout=10) as sock:
        for _ in range(round_trips):
            before = cpu_seconds(daemon.proc.pid)
            rawws.send_frame(sock, OP_TEXT, b"ping")
            assert rawws.read_frame(sock) == (OP_TEXT, b"ping")
            worst = max(worst, cpu_seconds(daemon.proc.pid) - before)
    return worst


# --- permessage-deflate: a final block (BFINAL=1) ---------------------------------------


@pytest.mark.timeout(30)
def test_deflate_after_a_final_block_memory_stays_bounded(start: Callable[..., Daemon]) -> None:
    """After a message ending with BFINAL=1, websockets' decoder is at end-of-stream and
    zlib appends every later compressed frame to ``unused_data``, forever."""
    daemon = start("--compression", "deflate", "--ping-interval", "0")
    with deflate_connect(daemon.port) as sock:
        sock.sendall(frame(OP_BINARY, compressed(b"hello", final=True), rsv=0x40))
        read_raw(sock)
        done = threading.Event()  # the server has handled all of it: a pong, or a close

        def watch() -> None:
            with contextlib.suppress(OSError):
                while read_raw(sock)[0] not in (OP_PONG, OP_CLOSE):
                    pass
            done.set()

        threading.Thread(target=watch, daemon=True).start()
        rss = RssPeak(daemon.proc.pid)
        junk = frame(OP_BINARY, os.urandom(1_000_000), rsv=0x40)
        with contextlib.suppress(OSError):  # the server may close at the first
            for _ in range(40):
                sock.sendall(junk)
            sock.sendall(frame(OP_PING, b"after the junk"))
        assert done.wait(20), "the server never got through the junk"
        growth = rss.stop()
    assert growth < 8, f"one connection grew the server by {growth:.0f} MiB"


def test_deflate_message_after_a_final_block_is_not_emptied(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--compression", "deflate", "--ping-interval", "0")
    decoder = PerMessageDeflate(False, False, 12, 15)

    def echo(sock: socket.socket, data: bytes) -> bytes:
        sock.sendall(data)
        opcode, fin, rsv1, payload = read_raw(sock)
        decoded = decoder.decode(Frame(Opcode(opcode), payload, fin, rsv1), max_size=None)
        return bytes(decoded.data)

    with deflate_connect(daemon.port) as sock:
        first = echo(sock, frame(OP_BINARY, compressed(b"hello", final=True), rsv=0x40))
        second = echo(sock, frame(OP_BINARY, compressed(b"world"), rsv=0x40))
    assert (first, second) == (b"hello", b"world")


# --- fairness: one client must not hold the event loop ------------------------------------


@pytest.mark.timeout(30)
def test_deflate_client_cannot_stall_other_clients(start: Callable[..., Daemon]) -> None:
    """~1 KiB frames that inflate to 1 MiB, echoes read: no back-pressure ever engages."""
    daemon = start("--compression", "deflate", "--ping-interval", "0", "--log-level", "info")
    bomb = frame(OP_BINARY, compressed(bytes(2**20), wbits=12), rsv=0x40)
    with flooding(deflate_connect(daemon.port), bomb):
        busy(daemon)
        worst = worst_wait(daemon, round_trips=30)
    assert worst < 0.5, f"a well-behaved client waited for {worst:.2f} s of the server's CPU"


@pytest.mark.timeout(30)
def test_flood_of_small_frames_cannot_stall_other_clients(start: Callable[..., Daemon]) -> None:
    """No compression: empty frames as fast as possible, echoes read."""
    daemon = start("--ping-interval", "0", "--log-level", "info")
    with flooding(rawws.connect(daemon.port), frame(OP_BINARY, b"") * 20000):
        busy(daemon)
        worst = worst_wait(daemon, round_trips=30)
    assert worst < 0.5, f"a well-behaved client waited for {worst:.2f} s of the server's CPU"


def busy(daemon: Daemon, seconds: float = 0.3) -> None:
    """Until the flood has kept the server busy for ``seconds`` of CPU: it is on."""
    began = cpu_seconds(daemon.proc.pid)
    deadline = time.monotonic() + 20
    while cpu_seconds(daemon.proc.pid) - began < seconds:
        assert time.monotonic() < deadline, "the flood did not reach the server"
        time.sleep(0.02)


# --- relay ---------------------------------------------------------------------------------


def stopped_reader(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    rawws.send_handshake(sock, port, path)
    rawws.read_handshake(sock)
    return sock


@pytest.mark.timeout(30)
def test_relay_close_policy_counts_each_slow_consumer_once(start: Callable[..., Daemon]) -> None:
    daemon = start(
        "--mode", "relay", "--slow-consumer", "close", "--slow-consumer-timeout", "0.5",
        "--ping-interval", "0", "--close-timeout", "1", "--log-level", "debug",
    )  # fmt: skip
    slow = stopped_reader(daemon.port, "/c")
    with rawws.connect(daemon.port, "/c", timeout=30) as fast:
        drain_in_background(fast)
        with rawws.connect(daemon.port, "/c", timeout=30) as publisher:
            message = frame(OP_BINARY, bytes(2**20 - 16))
            for _ in range(30):
                publisher.sendall(message)
        daemon.wait_for("slow consumer: closing", timeout=20)
        # Its closing handshake never completes (it does not read): until it is cut, the
        # publisher's messages keep finding it behind, and must not count it again.
        port = slow.getsockname()[1]
        daemon.wait_for("connection closed", 20, lambda e: e["peer"].endswith(f":{port}"))
    slow.close()
    daemon.proc.terminate()
    daemon.wait(15)
    lines = [e for e in daemon.events if e["event"] == "slow consumer: closing"]
    assert sum(e["count"] for e in lines) == 1, lines


@pytest.mark.timeout(30)
def test_relay_slow_consumers_leaving_are_logged_rate_limited(
    start: Callable[..., Daemon],
) -> None:
    """Above debug, a client-triggered event is at most one line a second (with a count):
    ten slow consumers leaving at once are the first at once, then one line for the rest."""
    daemon = start(
        "--mode", "relay", "--slow-consumer-timeout", "0.5", "--ping-interval", "0",
        "--log-level", "debug",
    )  # fmt: skip
    readers = [stopped_reader(daemon.port, "/flood") for _ in range(10)]
    ports = {sock.getsockname()[1] for sock in readers}
    with rawws.connect(daemon.port, "/flood") as publisher:
        publisher.settimeout(0.5)
        while sum(e["count"] for e in slow_lines(daemon, "slow consumer: dropping")) < 10:
            with contextlib.suppress(TimeoutError):
                publisher.sendall(frame(OP_BINARY, bytes(60000)))
        for sock in readers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        for port in ports:  # each has left (a reset), with messages dropped
            daemon.wait_for("connection closed", 20, of_port(port))
    # The held count is logged when its second is over: every leave is in a line.
    deadline = time.monotonic() + 10
    while sum(e["count"] for e in slow_lines(daemon, "slow consumer left")) < 10:
        assert time.monotonic() < deadline, slow_lines(daemon, "slow consumer left")
        time.sleep(0.05)
    lines = slow_lines(daemon, "slow consumer left")
    times = [datetime.fromisoformat(e["timestamp"]) for e in lines]
    span = (times[-1] - times[0]).total_seconds()
    assert len(lines) <= 2 + span, lines  # the first at once, then one a second at most
    assert all(e["level"] == "info" for e in lines)


def slow_lines(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events if e["event"].startswith(event)]


@pytest.mark.timeout(30)
def test_relay_held_publisher_completes_the_closing_handshake_in_a_drain(
    start: Callable[..., Daemon],
) -> None:
    """A publisher held behind a stopped reader answers the 1001 at once; its answer must
    be read (the docs: every client gets a clean close), not cut at the deadline."""
    daemon = start(
        "--mode", "relay", "--slow-consumer-timeout", "20", "--drain-timeout", "3",
        "--close-timeout", "10", "--ping-interval", "0", "--log-level", "debug",
    )  # fmt: skip
    reader = stopped_reader(daemon.port, "/d")
    filler = rawws.connect(daemon.port, "/d")
    filler.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            filler.send(frame(OP_BINARY, bytes(60000)))
    time.sleep(0.5)
    with rawws.connect(daemon.port, "/d") as publisher:
        publisher.sendall(frame(OP_TEXT, b"held"))
        time.sleep(0.3)
        daemon.proc.terminate()
        code, _ = rawws.read_close(publisher)
        rawws.send_frame(publisher, OP_CLOSE, rawws.close_payload(code))
        port = publisher.getsockname()[1]
        daemon.wait(15)
    reader.close()
    filler.close()
    closed = next(
        e
        for e in daemon.events
        if e["event"] == "connection closed" and e["peer"].endswith(f":{port}")
    )
    assert (closed["code_sent"], closed["code_received"]) == (1001, 1001)


# --- opening handshake ------------------------------------------------------------------------


def status_of(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ")[1]), head


def upgrade(host_lines: str, version: str = "13") -> bytes:
    return (
        f"GET / HTTP/1.1\r\n{host_lines}Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("hosts", ["", "Host: a\r\nHost: b\r\n"], ids=["no Host", "two Hosts"])
def test_upgrade_without_exactly_one_host_is_400(start: Callable[..., Daemon], hosts: str) -> None:
    """RFC 6455 4.2.1 (Host is required), 4.2.2; RFC 9112 3.2."""
    daemon = start()
    assert status_of(daemon.port, upgrade(hosts))[0] == 400


def test_unsupported_version_names_the_supported_one(start: Callable[..., Daemon]) -> None:
    """RFC 6455 4.2.2 and 4.4: the error carries Sec-WebSocket-Version."""
    daemon = start()
    _, head = status_of(daemon.port, upgrade("Host: x\r\n", version="8"))
    assert b"sec-websocket-version: 13" in head.lower(), head


def test_head_ended_by_lf_crlf_is_answered_at_once(start: Callable[..., Daemon]) -> None:
    daemon = start("--open-timeout", "3")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\n\r\n")
        sent = time.monotonic()
        answer = sock.recv(100)
        waited = time.monotonic() - sent
    assert answer.startswith(b"HTTP/1.1 400") and waited < 1, (answer, waited)
