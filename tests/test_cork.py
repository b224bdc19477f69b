"""Corked writes: what one turn of the server's loop sends a connection goes out in one
write system call, counted by the kernel (``syscw`` in /proc/PID/io: uvloop writes a
TCP socket with write/writev), in order."""

from collections.abc import Callable
from pathlib import Path

from tests import rawws
from tests.conftest import Daemon

QUIET = ("--ping-interval", "0")  # no pings: nothing else is written meanwhile


def writes(daemon: Daemon) -> int:
    """The write system calls the server has made so far."""
    assert daemon.proc is not None
    io = Path(f"/proc/{daemon.proc.pid}/io").read_text()
    return int(io.split("syscw:")[1].split()[0])


def test_a_pipelining_clients_echoes_go_in_one_write(start: Callable[..., Daemon]) -> None:
    daemon = start(*QUIET)
    with rawws.connect(daemon.port) as sock:
        rawws.send_frame(sock, rawws.OP_TEXT, b"warm")
        assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"warm")
        before = writes(daemon)
        sock.sendall(b"".join(rawws.frame(rawws.OP_TEXT, b"m%d" % i) for i in range(100)))
        got = [rawws.read_frame(sock) for _ in range(100)]
        made = writes(daemon) - before
    assert got == [(rawws.OP_TEXT, b"m%d" % i) for i in range(100)]
    assert made <= 5, made  # one per read the 100 messages came in; not one per message


def test_a_subscriber_gets_a_turns_messages_in_one_write(start: Callable[..., Daemon]) -> None:
    daemon = start("--mode", "relay", *QUIET)
    subscribers = [rawws.connect(daemon.port, "/room") for _ in range(20)]
    try:
        with rawws.connect(daemon.port, "/room") as publisher:
            rawws.send_frame(publisher, rawws.OP_TEXT, b"probe")
            for sock in subscribers:
                assert rawws.read_frame(sock) == (rawws.OP_TEXT, b"probe")
            before = writes(daemon)
            publisher.sendall(b"".join(rawws.frame(rawws.OP_TEXT, b"m%d" % i) for i in range(50)))
            for sock in subscribers:
                got = [rawws.read_frame(sock) for _ in range(50)]
                assert got == [(rawws.OP_TEXT, b"m%d" % i) for i in range(50)]
            made = writes(daemon) - before
        assert made <= 3 * 20, made  # about one per subscriber; not 50 each (1,000)
    finally:
        for sock in subscribers:
            sock.close()
