"""Daemon mode: detach with python-daemon, and report readiness to the invoking command.

python-daemon's ``DaemonContext.open()`` forks twice and lets the first parent exit at once,
which would tell the operator "started" before anything could fail. So the invoking
command forks once more first and waits on a pipe: the daemon writes ``ready`` once it
listens and its pidfile is written, or the line of the error that stopped it. The command
exits 0 only on ``ready``, and otherwise prints the daemon's error and exits 1.
"""

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import daemon

from wsechod.process import fds
from wsechod.process.pidfile import PidFile
from wsechod.process.privileges import Identity

# How long the invoking command waits for the daemon before giving up on it, and then for
# a daemon that failed to clean up (remove its pidfile) before the command reports.
READY_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 10.0

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
            return _Launcher(read_end, None if pidfile is None else pidfile.path).wait()
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
    report = _Report(pipe)
    status = 1
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o022,
        files_preserve=[*sockets, pipe],
        pidfile=pidfile,
        # Only the terminal's job-control signals: SIGTERM keeps the handler the CLI set,
        # which turns a stop during start-up into a graceful one.
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    try:
        if identity is not None:
            identity.set_groups()  # python-daemon would leave root's supplementary groups
            context.uid, context.gid = identity.uid, identity.gid
        context.open()  # the grandchild comes back from here as the daemon
        report.send(f"pid {os.getpid()}")
        status = serve(report.ready)
    except BaseException as exc:
        report.send(f"error {str(exc).partition(chr(10))[0] or type(exc).__name__}")
    finally:
        context.close()  # removes the pidfile
        logging.shutdown()
        os._exit(status)  # closing the pipe tells the launcher that cleaning up is done


class _Report:
    """The daemon's end of the pipe; closed once ready, so later errors go to the log only
    (and never to whatever file descriptor reuses the number)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        fds.private(fd)  # not for workers: the launcher waits for its end

    def send(self, line: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # the launcher is gone: nobody to tell
                os.write(self.fd, f"{line}\n".encode())

    def ready(self) -> None:
        self.send("ready")
        if self.fd is not None:
            os.close(self.fd)
            fds.released(self.fd)
            self.fd = None


class _Launcher:
    """The invoking command's side: wait for "ready" or an error, then for the clean-up."""

    def __init__(self, pipe: int, pidfile: Path | None = None) -> None:
        self.pipe = pipe
        self.pidfile = pidfile  # removed if a daemon killed with SIGKILL left it
        self.pid: int | None = None
        self.buffer = b""

    def wait(self) -> int:
        def interrupted(signum: int, _: object) -> None:
            raise KeyboardInterrupt(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupted)
        try:
            return self._wait()
        except KeyboardInterrupt as exc:
            signum = exc.args[0] if exc.args else signal.SIGINT
            self._stop_daemon()
            print("wsechod: interrupted; the daemon that was starting is stopped", file=sys.stderr)
            return 128 + int(signum)

    def _wait(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT
        while (line := self._line(deadline)) is not None:
            kind, _, rest = line.partition(" ")
            if kind == "pid":
                self.pid = int(rest)
            elif kind == "ready":
                return 0
            elif kind == "error":
                self._line(time.monotonic() + CLEANUP_TIMEOUT)  # EOF: it has cleaned up
                print(f"wsechod: error: {rest}", file=sys.stderr)
                return 1
        if time.monotonic() >= deadline:
            self._stop_daemon()
            print(
                f"wsechod: error: the daemon did not become ready within {READY_TIMEOUT:g} s",
                file=sys.stderr,
            )
        else:
            print("wsechod: error: the daemon exited during start-up", file=sys.stderr)
        return 1

    def _line(self, deadline: float) -> str | None:
        """The daemon's next line; None at EOF or at the deadline."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.pipe], [], [], remaining)[0]:
                return None
            chunk = os.read(self.pipe, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def _stop_daemon(self) -> None:
        """A daemon that never became ready: SIGTERM, again (which forces), then SIGKILL."""
        deadline = time.monotonic() + 1.0
        while self.pid is None and (line := self._line(deadline)) is not None:
            if line.startswith("pid "):  # sent, but not read yet when we were interrupted
                self.pid = int(line[4:])
        if self.pid is None:
            return
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + grace
            while self._line(deadline) is not None:
                pass
            if time.monotonic() < deadline:
                break  # EOF: it is gone
        if self.pidfile is not None:  # killed before it could remove its own
            with contextlib.suppress(OSError):
                if self.pidfile.read_text().strip() == str(self.pid):
                    self.pidfile.unlink()
