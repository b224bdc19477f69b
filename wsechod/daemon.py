"""Daemon mode: detach with python-daemon, and report readiness to the invoking command.

python-daemon's ``DaemonContext.open()`` forks twice and lets the first parent exit at once,
which would tell the operator "started" before anything could fail. So the invoking
command forks once more first and waits on a pipe: the daemon writes ``ready`` once it
listens and its pidfile is written, or the line of the error that stopped it. The command
exits 0 only on ``ready``, and otherwise prints the daemon's error and exits 1.
"""

import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import daemon

from wsechod.pidfile import PidFile
from wsechod.privileges import Identity

# How long the invoking command waits for the daemon before giving up on it.
READY_TIMEOUT = 30.0

# Runs the daemon's work, calling its argument once serving; returns the exit status.
Serve = Callable[[Callable[[], None]], int]


def detach(
    sockets: list[socket.socket],
    pidfile: PidFile | None,
    identity: Identity | None,
    serve: Serve,
) -> int:
    """Start ``serve`` in a detached daemon; return the invoking command's exit status."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            return _wait_until_ready(read_end)
        except KeyboardInterrupt:
            print("wsechod: interrupted; the daemon may still be starting", file=sys.stderr)
            return 130
        finally:
            os.close(read_end)
            os.waitpid(child, 0)  # it exits as soon as it has forked again
    os.close(read_end)
    _become_daemon(write_end, sockets, pidfile, identity, serve)


def _become_daemon(
    pipe: int,
    sockets: list[socket.socket],
    pidfile: PidFile | None,
    identity: Identity | None,
    serve: Serve,
) -> NoReturn:
    """Runs in the forked child; never returns."""
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o022,
        files_preserve=[*sockets, pipe],
        pidfile=pidfile,
    )
    if identity is not None:
        identity.set_groups()  # python-daemon would leave root's supplementary groups
        context.uid, context.gid = identity.uid, identity.gid
    report = _Report(pipe)
    status = 1
    try:
        context.open()  # the grandchild comes back from here as the daemon
        report.send(f"pid {os.getpid()}")
        status = serve(report.ready)
    except BaseException as exc:
        report.send(f"error {str(exc).partition(chr(10))[0] or type(exc).__name__}")
    finally:
        context.close()  # removes the pidfile
        logging.shutdown()
        os._exit(status)


class _Report:
    """The daemon's end of the pipe; closed once ready, so later errors go to the log only
    (and never to whatever file descriptor reuses the number)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, line: str) -> None:
        if self.fd is not None:
            os.write(self.fd, f"{line}\n".encode())

    def ready(self) -> None:
        self.send("ready")
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _wait_until_ready(pipe: int) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    buffer = b""
    pid: int | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            print(
                f"wsechod: error: the daemon did not become ready within {READY_TIMEOUT:g} s",
                file=sys.stderr,
            )
            return 1
        chunk = os.read(pipe, 4096)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode(errors="replace").partition(" ")
            if kind == "pid":
                pid = int(rest)
            elif kind == "ready":
                return 0
            elif kind == "error":
                print(f"wsechod: error: {rest}", file=sys.stderr)
                return 1
        if not chunk:
            print("wsechod: error: the daemon exited during start-up", file=sys.stderr)
            return 1
