"""Limits a client can push against, and what the operator hears: one line per second per
reason, with a count, however many clients are turned away."""

import contextlib
import os
import re
import selectors
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests import rawws
from tests.conftest import Daemon, RssPeak
from tests.test_tls import issue, trusting


def upgrade(port: int) -> bytes:
    """One upgrade attempt: the status line, or b"" if the server closed without one."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            rawws.send_handshake(sock, port)
            head = rawws.until_eof(sock)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    return head.split(b"\r\n", 1)[0]


def refusals(daemon: Daemon, reason: str) -> list[dict[str, Any]]:
    return [
        e for e in daemon.events if e["event"] == "connection refused" and e.get("reason") == reason
    ]


def stop(daemon: Daemon) -> None:
    """SIGTERM: counts still held back are logged at shutdown."""
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    daemon.wait_for("stopped")


@pytest.mark.timeout(60)
def test_refusals_at_max_connections_are_one_line_a_second_with_a_count(
    start: Callable[..., Daemon],
) -> None:
    daemon = start("--max-connections", "1")
    statuses = []
    with rawws.connect(daemon.port):  # the one connection allowed
        began = time.monotonic()
        while time.monotonic() - began < 2.5:  # a client retrying as fast as it can
            statuses.append(upgrade(daemon.port))
        elapsed = time.monotonic() - began
    attempts = len(statuses)
    stop(daemon)
    assert all(b" 503 " in s for s in statuses), set(statuses)
    lines = refusals(daemon, "max_connections")
    print(f"{attempts} refusals in {elapsed:.1f} s: {len(lines)} log lines")
    assert sum(e["count"] for e in lines) == attempts  # every refusal is accounted for
    assert len(lines) <= elapsed + 2  # the first at once, then one a second at most
    assert all(e["level"] == "warning" for e in lines)


@pytest.mark.timeout(60)
def test_running_out_of_file_descriptors_is_refused_and_logged(
    start: Callable[..., Daemon],
) -> None:
    """Under a low open-files limit, clients beyond it get 503 (not the silent close the
    event loop would do), and the operator a rate-limited warning with a count."""
    daemon = start("--max-connections", "0", prefix=("prlimit", "--nofile=128:128", "--"))
    held: list[socket.socket] = []
    statuses: list[bytes] = []
    began = time.monotonic()
    try:
        for _ in range(200):
            try:
                held.append(rawws.connect(daemon.port))
                statuses.append(b"101")
            except ConnectionError as exc:
                statuses.append(str(exc).encode())
        elapsed = time.monotonic() - began
        # Still serving those it kept.
        rawws.send_frame(held[0], rawws.OP_TEXT, b"alive")
        assert rawws.read_frame(held[0]) == (rawws.OP_TEXT, b"alive")
    finally:
        for sock in held:
            sock.close()
    stop(daemon)
    at_capacity = sum(b"503" in s for s in statuses)
    print(f"{len(held)} kept, {at_capacity} refused with 503 under 128 file descriptors")
    assert 50 < len(held) < 128
    assert at_capacity > 0
    lines = refusals(daemon, "open files limit")
    assert sum(e["count"] for e in lines) >= at_capacity
    assert len(lines) <= elapsed + 2


def client_hello() -> bytes:
    """The first flight of a TLS client: what a client stalled after it has sent."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def hog(port: int, count: int, first: bytes) -> list[socket.socket]:
    """``count`` connections from 127.0.0.1 that send ``first`` and then nothing."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first:
            sock.sendall(first)
        held.append(sock)
    return held


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stall", ["tcp", "tls before hello", "tls after hello"])
def test_one_address_holding_pending_handshakes_cannot_keep_another_out(
    start: Callable[..., Daemon], tmp_path: Path, stall: str
) -> None:
    """Under a low open-files limit, one address opening connections and never finishing
    their handshakes (idle TCP, or TLS stalled before or after the ClientHello) has its
    oldest ones cut to make room: a client from another address gets in at once."""
    tls: tuple[str, ...] = ()
    if stall != "tcp":
        files = issue(tmp_path)
        tls = ("--tls-cert", str(files.cert), "--tls-key", str(files.key))
    limit = ("prlimit", "--nofile=128:128", "--")
    daemon = start("--open-timeout", "30", "--max-connections", "0", *tls, prefix=limit)
    held = hog(daemon.port, 200, client_hello() if stall == "tls after hello" else b"")
    try:
        raw = socket.create_connection(
            ("127.0.0.1", daemon.port), timeout=10, source_address=("127.0.0.2", 0)
        )
        with (
            trusting(files.ca).wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        ) as sock:
            rawws.send_handshake(sock, daemon.port)
            rawws.read_handshake(sock)
            rawws.send_frame(sock, rawws.OP_TEXT, b"from another address")
            assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"from another address")
    finally:
        for sock in held:
            sock.close()
    cut = daemon.wait_for("pending handshake cut")
    assert (cut["client"], cut["level"]) == ("127.0.0.1", "warning")
    # From a third address: the hog's connections may not all be gone yet.
    raw = socket.create_connection(
        ("127.0.0.1", daemon.port), timeout=10, source_address=("127.0.0.3", 0)
    )
    with trusting(files.ca).wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        page = rawws.until_eof(sock).decode()
    assert re.search(r"^wsechod_handshakes_cut_total [1-9]", page, re.MULTILINE), page


def test_pending_handshakes_count_against_max_connections_per_ip(
    start: Callable[..., Daemon],
) -> None:
    """Connections are counted for their address from their accept: idle ones too. One
    beyond the limit gets a second (not open_timeout) to ask, and then a 503."""
    daemon = start("--max-connections-per-ip", "2", "--open-timeout", "30")
    idle = hog(daemon.port, 2, b"")
    try:
        assert b" 503 " in upgrade(daemon.port)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as late:
            assert late.recv(1) == b""  # cut after a second, well before the open_timeout
    finally:
        for sock in idle:
            sock.close()
    with rawws.connect(daemon.port):  # they are gone: room again
        pass


class Flood(threading.Thread):
    """Sends each socket its data on one thread (non-blocking: a socket the server does
    not read waits, the others go on), then keeps them open."""

    def __init__(self, socks: list[socket.socket], data: bytes) -> None:
        super().__init__(daemon=True)
        self.left = {sock: memoryview(data) for sock in socks}
        self.done = threading.Event()
        for sock in socks:
            sock.setblocking(False)
        self.start()

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self.left:
                selector.register(sock, selectors.EVENT_WRITE)
            while self.left and not self.done.is_set():
                for key, _ in selector.select(0.1):
                    sock = cast(socket.socket, key.fileobj)
                    try:
                        sent = sock.send(self.left[sock][:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # closed by the server
                        sent = len(self.left[sock])
                    self.left[sock] = self.left[sock][sent:]
                    if not self.left[sock]:
                        del self.left[sock]
                        selector.unregister(sock)


@pytest.mark.timeout(120)
def test_many_clients_holding_frames_open_stay_within_the_memory_limit(
    start: Callable[..., Daemon],
) -> None:
    """200 clients each send all of a 1 MiB frame but its last byte: 200 MiB without a
    budget. With memory_limit = 32 MiB the server stops reading them, then closes the
    heaviest with 1013; a client sending small messages is answered throughout."""
    limit, clients, size = 32 * 2**20, 200, 2**20
    daemon = start("--memory-limit", str(limit), "--ping-interval", "0", "--log-level", "info")
    rss = RssPeak(daemon.proc.pid)
    header = struct.pack("!BBQ", 0x82, 0xFF, size) + os.urandom(4)  # masked, 64-bit length
    hogs = [rawws.connect(daemon.port) for _ in range(clients)]
    flood = Flood(hogs, header + bytes(size - 1))
    try:
        with rawws.connect(daemon.port) as good:
            good.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + 60
            shed = None
            while shed is None:
                rawws.send_frame(good, rawws.OP_TEXT, b"still here")
                assert rawws.read_frame(good) == (rawws.OP_TEXT, b"still here")
                assert time.monotonic() < deadline, daemon.log[-3000:]
                shed = next(
                    (e for e in daemon.events if e["event"] == "connection closed: memory limit"),
                    None,
                )
    finally:
        growth = rss.stop()
        flood.done.set()
        for sock in hogs:
            sock.close()
    reached = daemon.wait_for("memory limit reached: reading paused")
    assert (reached["limit"], reached["level"]) == (limit, "warning")
    bound = (limit + clients * 256 * 1024) / 2**20 + 16  # + one read each + the allocator
    print(f"{clients} clients holding 1 MiB frames: server grew {growth:.0f} MiB (bound {bound})")
    assert growth < bound
