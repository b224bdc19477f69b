"""The keepalive never switches itself off: a pong that comes late (after the next ping
was due) is followed by the next ping at once, whatever ``ping_timeout`` is, and for a
relay publisher whose reading was held too. Raw sockets: a client library would answer
pings on its own."""

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import rawws
from tests.conftest import Daemon
from tests.rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, frame


class Pinged:
    """A raw client that reads on a thread, notes each ping the server sends, and answers
    it as ``answer(n)`` says: a delay in seconds before the pong, or None for no pong."""

    def __init__(self, port: int, path: str, answer: Callable[[int], float | None]) -> None:
        self.sock = rawws.connect(port, path)
        self.sock.settimeout(30)
        self.answer = answer
        self.pings: list[float] = []
        self.close_code: int | None = None
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # one writer at a time: pongs and the test's frames
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        try:
            while True:
                opcode, payload = rawws.read_frame(self.sock)
                if opcode == OP_CLOSE:
                    with self._cond:
                        self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                        self._cond.notify_all()
                    return
                if opcode != OP_PING:
                    continue
                with self._cond:
                    self.pings.append(time.monotonic())
                    n = len(self.pings)
                    self._cond.notify_all()
                delay = self.answer(n)
                if delay is not None:
                    time.sleep(delay)  # the stimulus: a pong that comes late
                    self.send(frame(OP_PONG, payload))
        except OSError:
            with self._cond:
                self._cond.notify_all()

    def wait_pings(self, n: int, timeout: float) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.pings) >= n, timeout)
        assert ok, f"only {len(self.pings)} pings of {n} within {timeout} s"

    def wait_close(self, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.close_code is not None, timeout)
        assert self.close_code is not None, "the server did not close the connection"
        return self.close_code

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(30)
def test_a_late_pong_within_ping_timeout_keeps_the_keepalive_going(
    start: Callable[..., Daemon],
) -> None:
    """ping_timeout > ping_interval: a client may answer after the next ping was due. It
    then gets the next ping, and if it stops answering, it is dropped (before, the late
    pong ended the keepalive: a client that then stopped reading was kept forever)."""
    daemon = start("--ping-interval", "0.4", "--ping-timeout", "2")
    # The first pong 0.8 s late (after ping_at + ping_interval); no pong to the second.
    client = Pinged(daemon.port, "/", lambda n: 0.8 if n == 1 else None)
    try:
        client.wait_pings(2, timeout=10)
        assert client.wait_close(timeout=10) == 1011
    finally:
        client.close()


@pytest.mark.timeout(30)
def test_without_ping_timeout_a_late_pong_is_followed_by_more_pings(
    start: Callable[..., Daemon],
) -> None:
    """ping_timeout = 0 waits for a pong forever, but keeps pinging once it comes."""
    daemon = start("--ping-interval", "0.3", "--ping-timeout", "0")
    client = Pinged(daemon.port, "/", lambda n: 0.7 if n == 1 else 0.0)
    try:
        client.wait_pings(4, timeout=10)
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_relay_publisher_held_past_its_ping_deadline_keeps_being_pinged(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A publisher held (not read) while a receiver is behind cannot be heard answering
    its ping, so its deadline waits; once released, its late pong must re-arm the
    keepalive. The receiver joins before a reload turns the keepalive on, so that it is
    judged slow (which releases the publisher) rather than dropped by its own keepalive."""
    config = tmp_path / "wsechod.toml"
    config.write_text("ping_interval = 0\n")
    daemon = start(
        "--config", str(config), "--mode", "relay", "--write-limit", "1024",
        "--slow-consumer-timeout", "2",
    )  # fmt: skip
    receiver = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rawws.send_handshake(receiver, daemon.port, "/held")
    rawws.read_handshake(receiver)  # then never read again
    config.write_text("ping_interval = 0.3\nping_timeout = 0.5\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("setting changed", where=lambda e: e["key"] == "ping_timeout")
    publisher = Pinged(daemon.port, "/held", lambda n: 0.0)
    message = frame(OP_BINARY, bytes(512 * 1024))

    def send() -> None:
        with contextlib.suppress(OSError):
            for _ in range(24):
                publisher.send(message)

    threading.Thread(target=send, daemon=True).start()
    try:
        daemon.wait_for("slow consumer: dropping its messages", timeout=20)
        pinged = len(publisher.pings)
        publisher.wait_pings(pinged + 3, timeout=10)
    finally:
        publisher.close()
        receiver.close()
