"""wsechod inside another program: the same engine, lifecycle and drain as the command,
on a uvloop event loop in a thread of its own (``serve_in_thread``) or as one task on the
caller's loop (``running``).

What the command adds for a process that owns itself (signal handlers, systemd, the
open-files limit, pidfiles, logging handlers, reading ``/etc/wsechod`` and ``WSECHOD_*``)
is none of an embedded server's business: it listens, serves, and drains when the
program says so. Settings are keyword arguments named like the config file's keys and
checked like its values; a file and the environment are read only when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

from wsechod.engine.addresses import format_address
from wsechod.log import get_logger
from wsechod.runtime import listeners
from wsechod.runtime.lifecycle import DrainReport, Lifecycle, drain_bound, serve
from wsechod.runtime.listeners import BindError
from wsechod.runtime.run import FINISH_TIMEOUT, run
from wsechod.settings import CONFIG_ENV, Loaded, Settings, SettingsError, load

__all__ = [
    "BindError",
    "DrainReport",
    "Server",
    "SettingsError",
    "ThreadedServer",
    "running",
    "serve_in_thread",
]

log = get_logger("wsechod")

STOP_REASON = "stop()"  # the "stop requested" event's reason when the program stops it

# Keys only a process that owns itself uses. Given as arguments they are an error (they
# would silently do nothing); from a shared config file or environment, a warning.
_LOGGING = "an embedded server logs to logging.getLogger('wsechod'), which its program configures"
PROCESS_KEYS = {
    "daemon": "an embedded server runs in its program's process",
    "pidfile": "an embedded server runs in its program's process",
    "user": "an embedded server runs as its program's user",
    "group": "an embedded server runs as its program's user",
    "unix_socket_owner": "an embedded server does not give its socket files away",
    "workers": "an embedded server is one event loop in its program's process",
    "log_level": _LOGGING,
    "log_format": _LOGGING,
    "log_file": _LOGGING,
    "syslog_socket": _LOGGING,
}


# --- settings and sockets ----------------------------------------------------------------


def load_settings(
    arguments: Mapping[str, Any],
    *,
    config: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
    caller: str,
) -> Loaded:
    """The settings of an embedded server: ``arguments`` over ``environ``'s ``WSECHOD_*``
    variables (only if given) over the ``config`` file (only if given, or named by
    ``environ``'s ``WSECHOD_CONFIG``) over the defaults. Never ``/etc/wsechod``."""
    for key, value in arguments.items():
        if key in PROCESS_KEYS:
            raise SettingsError(f"invalid {key} {value!r} (from {caller}): {PROCESS_KEYS[key]}")
    environ = {} if environ is None else environ
    path = os.fspath(config) if config is not None else environ.get(CONFIG_ENV, "")
    loaded = load({}, environ, path, given=arguments, given_by=caller)
    ignored = [key for key in PROCESS_KEYS if loaded.sources[key] != "default"]
    for notice in loaded.notices:
        log.warning(notice.event, **notice.fields)
    if ignored:
        log.warning("settings have no effect when embedded", keys=ignored)
    return loaded


def bind(settings: Settings) -> listeners.Bound:
    """The listening sockets, bound in the caller's thread: "address already in use"
    is the caller's ``BindError``, with the line the command prints."""
    where = listeners.addresses(settings)
    bound = listeners.bind(where, mode=int(settings.unix_socket_mode, 8), backlog=settings.backlog)
    for path in bound.replaced:
        log.warning("stale unix socket replaced", path=path)
    return bound


def _release(bound: listeners.Bound) -> None:
    bound.close()
    for path, why in bound.remove_files():
        log.warning("cannot remove unix socket", path=path, error=why)


# --- the handles -------------------------------------------------------------------------


class URL(str):
    """A server's URL, a plain string; called, the URL of ``path`` with the test peer's
    controls in its query string (``controls = true``, as in the pytest fixtures):
    ``url(close=4000, after=2)``, ``url("/room", delay=100)``; True is 1, False 0."""

    def __call__(self, path: str = "/", **controls: object) -> str:
        values = {k: int(v) if isinstance(v, bool) else v for k, v in controls.items()}
        query = urllib.parse.urlencode(values)
        return f"{self}{path}" + (f"?{query}" if query else "")


class Server:
    """A listening embedded server: where it listens, and a way to stop it."""

    def __init__(self, settings: Settings, bound: listeners.Bound) -> None:
        self.settings = settings
        self._bound = bound
        #: Every listening address, as the ``listening`` event shows them: ``host:port``,
        #: ``[v6]:port``, a unix socket's path, ``@name``.
        self.addresses: list[str] = [format_address(s.getsockname()) for s in bound.sockets]
        self._tcp = [s.getsockname()[:2] for s in bound.sockets if s.family != socket.AF_UNIX]
        #: How the drain went, once stopped.
        self.report: DrainReport | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._life: Lifecycle | None = None
        self._stop_reason: str | None = None

    @property
    def host(self) -> str:
        """The first TCP listener's address (``0.0.0.0`` or ``::`` when it is every
        interface)."""
        return str(self._first_tcp()[0])

    @property
    def port(self) -> int:
        """The first TCP listener's port (the one picked, with ``port=0``)."""
        return int(self._first_tcp()[1])

    @property
    def url(self) -> URL:
        """``ws://host:port`` (``wss://`` with TLS) to connect to the first TCP listener;
        a wildcard address is replaced with the loopback one. Called, a path's URL with
        the test peer's controls: ``server.url(close=4000, after=2)``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        scheme = "wss" if self.settings.tls_cert else "ws"
        return URL(f"{scheme}://{format_address((host, self.port))}")

    def _first_tcp(self) -> tuple[str, int]:
        if not self._tcp:
            raise ValueError(f"no TCP listener: listening on {', '.join(self.addresses)}")
        host, port = self._tcp[0]
        return str(host), int(port)

    def request_stop(self, reason: str = STOP_REASON) -> None:
        """Begin the drain (clients get 1001, within ``drain_timeout``), from any thread;
        returns at once. A second call cuts the drain short, as a second SIGTERM does."""
        self._request(reason, again=True)

    def _request(self, reason: str, *, again: bool) -> None:
        """Pass the request to the lifecycle's loop (or keep it for when there is one);
        unless ``again``, only if none was made yet."""
        with self._lock:
            if self._stop_reason is not None and not again:
                return
            self._stop_reason = self._stop_reason or reason
            if self._loop is not None and self._life is not None:
                self._loop.call_soon_threadsafe(self._life.request_stop, reason)

    @contextlib.contextmanager
    def _attached(self, life: Lifecycle) -> Iterator[None]:
        """Between the lifecycle's start and the end of its drain, a stop reaches it
        (and one asked for earlier reaches it now)."""
        with self._lock:
            self._loop, self._life = asyncio.get_running_loop(), life
            if self._stop_reason is not None:
                life.request_stop(self._stop_reason)
        try:
            yield
        finally:
            with self._lock:
                self._loop = self._life = None

    def __repr__(self) -> str:
        return f"<wsechod {self.settings.mode} server on {', '.join(self.addresses)}>"


class ThreadedServer(Server):
    """A server on its own event loop in a background thread (``serve_in_thread``)."""

    def __init__(self, settings: Settings, bound: listeners.Bound) -> None:
        super().__init__(settings, bound)
        self._listening = threading.Event()  # or the thread ended: see _error
        self._error: BaseException | None = None
        where = ", ".join(self.addresses)
        self._thread = threading.Thread(target=self._run, name=f"wsechod {where}", daemon=True)

    def _start(self) -> None:
        """Start the thread and wait until it listens (raising what stopped it)."""
        self._thread.start()
        try:
            self._listening.wait()
        except BaseException:  # KeyboardInterrupt while starting: do not leave it behind
            self.stop()
            raise
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        try:
            self.report = run(self.settings, self._bound.listeners(), attach=self._attach)
        except BaseException as exc:  # handed to the caller: start() or stop() raises it
            self._error = exc
        finally:
            _release(self._bound)
            self._listening.set()

    @contextlib.contextmanager
    def _attach(self, life: Lifecycle) -> Iterator[Callable[[], None]]:
        with self._attached(life):
            yield self._listening.set

    def stop(self, timeout: float | None = None) -> DrainReport | None:
        """Drain and wait for the thread to end; from the server's own thread (an
        application callback), only ask. Waits at most ``timeout`` seconds (default: the
        drain's own bound, ``drain_timeout`` plus a few seconds), then cuts the drain
        short; raises TimeoutError if the thread still does not end, and what the
        server failed with, if it did."""
        self._request(STOP_REASON, again=False)
        if threading.current_thread() is self._thread:
            return None
        if timeout is None:
            timeout = drain_bound(self.settings) + FINISH_TIMEOUT + 2.0
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._request("stop() timed out", again=True)  # the second request: stop now
            self._thread.join(FINISH_TIMEOUT + 2.0)
            if self._thread.is_alive():
                raise TimeoutError(f"{self!r} did not stop")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.report

    @property
    def thread(self) -> threading.Thread:
        """The thread the server runs in (named after its addresses)."""
        return self._thread

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_in_thread(
    *,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **settings: Any,
) -> ThreadedServer:
    """Start a server on its own uvloop event loop in a background thread and return
    once it listens. Use it as a context manager (leaving it drains and joins the
    thread) or call ``stop()``::

        with wsechod.serve_in_thread(port=0) as server:
            connect(server.url)

    ``settings``: keys of the config file (``port=0``, ``mode="relay"``, ...), checked
    like its values. ``config``: a TOML file to read too. ``environ``: a mapping whose
    ``WSECHOD_*`` variables are read too (``environ=os.environ``), including
    ``WSECHOD_CONFIG``. Raises ``SettingsError`` (a bad setting), ``BindError`` (say, the
    port is in use), or what else stopped the start, in the caller's thread.
    """
    loaded = load_settings(settings, config=config, environ=environ, caller="serve_in_thread()")
    server = ThreadedServer(loaded.settings, bind(loaded.settings))
    server._start()
    return server


@contextlib.asynccontextmanager
async def running(
    *,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **settings: Any,
) -> AsyncIterator[Server]:
    """Serve on the running event loop (one task) for the duration of the block, then
    drain; for programs that already run a loop. Settings and errors as for
    ``serve_in_thread``. ``server.request_stop()`` begins the drain early; leaving the
    block waits for it to end."""
    loaded = load_settings(settings, config=config, environ=environ, caller="running()")
    bound = bind(loaded.settings)
    server = Server(loaded.settings, bound)
    loop = asyncio.get_running_loop()
    listening: asyncio.Future[None] = loop.create_future()

    async def main() -> DrainReport:
        life = Lifecycle(server.settings)
        with server._attached(life):
            return await serve(bound.listeners(), life, ready=lambda: listening.set_result(None))

    try:
        task = loop.create_task(main(), name=repr(server))
        try:
            either: set[asyncio.Future[Any]] = {task, listening}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while starting: take the server down with it
            server._request(STOP_REASON, again=False)
            task.cancel()
            await asyncio.wait({task})
            raise
        if not listening.done():
            task.result()  # raises what stopped the start
        try:
            yield server
        finally:
            server._request(STOP_REASON, again=False)
            server.report = await task
    finally:
        _release(bound)
