"""Runtime: the event loop, the signals, one stop future and one drain.

``serve()`` is the library entry point: it runs the server on sockets someone else produced
until ``Lifecycle.stop`` resolves, then drains. ``run()`` is what the CLI calls: it builds the
uvloop loop and turns SIGTERM/SIGINT into ``Lifecycle.request_stop``, the same call an
embedding program makes.
"""

import asyncio
import os
import resource
import signal
import socket
from collections.abc import Callable

import structlog
import uvloop

from wsechod import __version__, brokers, logs, systemd
from wsechod.channels import Hub
from wsechod.echo import echo
from wsechod.relay import make_relay
from wsechod.server import Server
from wsechod.settings import Settings
from wsechod.sockets import addresses

log = structlog.stdlib.get_logger("wsechod")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = {*STOP_SIGNALS, signal.SIGHUP}
STATUS_INTERVAL = 10.0  # seconds between STATUS= updates to systemd
FINISH_TIMEOUT = 1.0  # seconds for leftover tasks to end once the drain is over

# Stop signals that arrived before the event loop could handle them.
_early_stops: list[str] = []


def catch_early_signals() -> None:
    """Until the loop runs: a first SIGTERM/SIGINT is kept and becomes a graceful stop as
    soon as the server is up; a second one ends start-up at once (it may be stuck, say on a
    name lookup); SIGHUP is ignored (there is nothing to reopen yet)."""

    def early(signum: int, _: object) -> None:
        if signum == signal.SIGHUP:
            return
        if _early_stops:
            raise SystemExit(128 + signum)
        _early_stops.append(signal.Signals(signum).name)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, early)


class Lifecycle:
    """The stop future, and a second one that cuts the drain short ("stop now")."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.stop: asyncio.Future[str] = loop.create_future()
        self.force: asyncio.Future[str] = loop.create_future()
        self.server: Server | None = None  # set once serving, for status reports

    def status(self) -> str:
        """One human line for systemd's STATUS=: mode, addresses, open connections."""
        if self.server is None:
            return "starting"
        where = ", ".join(addresses(self.server.sockets))
        state = "draining" if self.server.draining else self.server.settings.mode
        return f"{state} on {where}: {len(self.server.active)} connections"

    def request_stop(self, reason: str) -> None:
        """First call: drain gracefully. Second call: end the drain at once."""
        if not self.stop.done():
            if self.server is not None:
                self.server.stop_accepting()  # synchronously, before anyone hears of it
            self.stop.set_result(reason)
        elif not self.force.done():
            self.force.set_result(reason)


async def serve(
    settings: Settings, sockets: list[socket.socket], life: Lifecycle, handoff: bool = False
) -> None:
    """Serve on ``sockets`` until ``life.stop`` resolves, then drain and return.
    ``handoff``: the sockets came from systemd (see ``Server``)."""
    hub: Hub | None = None
    if settings.mode == "relay":
        hub = Hub(settings, brokers.create(settings))
        await hub.broker.start(hub.deliver)
        server = Server(settings, make_relay(hub), hub.admit, hub.broker.degraded, handoff)
    else:
        server = Server(settings, echo, handoff=handoff)
    await server.start(sockets)
    life.server = server
    log.info("listening", addresses=addresses(server.sockets), mode=settings.mode, pid=os.getpid())
    life.ready.set_result(None)

    reason = await life.stop
    log.info(
        "stop requested",
        reason=reason,
        connections=len(server.active),
        drain_timeout=settings.drain_timeout,
    )
    life.force.add_done_callback(
        lambda f: log.warning("stopping now", reason=f.result(), connections=len(server.active))
    )
    # Cross-instance relay ends with the stop (dropping the connection unsubscribes); the
    # broker closes while the connections drain, within the same deadline.
    closing = None if hub is None else asyncio.ensure_future(hub.broker.close())
    report = await server.drain(life.force)
    if closing is not None:
        await closing
    log.info(
        "drained",
        duration=round(report.duration, 3),
        connections=report.connections,
        force_closed=report.force_closed,
        **({} if hub is None else {"dropped": hub.dropped}),
    )


def _reload(notifier: systemd.Notifier, life: Lifecycle) -> None:
    """SIGHUP: reopen the log file, so logrotate can move it without losing a line."""
    notifier.reloading()
    if logs.reopen():
        log.info("log file reopened")
    else:
        log.info("SIGHUP: nothing to reload")
    notifier.send(READY=1, STATUS=life.status())


async def _report(notifier: systemd.Notifier, life: Lifecycle) -> None:
    """Keep systemd's STATUS= current and, when asked for, pet the watchdog. It runs on the
    event loop, so a wedged loop stops the pings and systemd restarts the service."""
    interval = min(notifier.watchdog_interval or STATUS_INTERVAL, STATUS_INTERVAL)
    while True:
        if notifier.watchdog_interval is not None:
            notifier.send(WATCHDOG=1, STATUS=life.status())
        else:
            notifier.send(STATUS=life.status())
        await asyncio.sleep(interval)


async def _main(
    settings: Settings,
    sockets: list[socket.socket],
    on_ready: Callable[[], None] | None,
    handoff: bool,
) -> None:
    loop = asyncio.get_running_loop()
    life = Lifecycle()
    notifier = systemd.Notifier()

    reporter: asyncio.Task[None] | None = None

    def ready(_: object) -> None:
        nonlocal reporter
        notifier.ready(life.status())
        if notifier.enabled:
            reporter = loop.create_task(_report(notifier, life))
        if on_ready is not None:
            on_ready()

    def stopping(_: object) -> None:
        active = 0 if life.server is None else len(life.server.active)
        notifier.send(STOPPING=1, STATUS=f"stopping: draining {active} connections")

    life.ready.add_done_callback(ready)
    life.stop.add_done_callback(stopping)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, life.request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, _reload, notifier, life)
    for name in _early_stops:  # sent while we were starting
        life.request_stop(name)
    _early_stops.clear()
    try:
        await serve(settings, sockets, life, handoff)
    finally:
        # Stopped: later signals wait, unanswered, until the process exits (status 0)
        # rather than kill it with a traceback on the way out.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
        if reporter is not None:
            reporter.cancel()
        notifier.close()


def run(
    settings: Settings,
    sockets: list[socket.socket],
    on_ready: Callable[[], None] | None = None,
    handoff: bool = False,
) -> int:
    """Run the daemon in this process until it is stopped; returns the exit status.

    ``on_ready`` is called once the server is listening (the daemon's parent waits for it);
    ``handoff``: the sockets came from systemd socket activation.
    """
    log.info("starting", version=__version__, pid=os.getpid())
    _raise_open_files_limit(settings.max_connections)
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(_main(settings, sockets, on_ready, handoff))
        _finish(loop)
    finally:
        loop.close()
    log.info("stopped")
    return 0


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left, but wait for it only so long: asyncio.Runner would wait forever
    for a library task that does not end when cancelled (seen: a redis-py write to a busy
    Redis), and a daemon that was told to stop must stop."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=FINISH_TIMEOUT))
        for task in stuck:
            log.warning("task did not stop; exiting anyway", task=task.get_name())
    loop.run_until_complete(loop.shutdown_asyncgens())


def _raise_open_files_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit to the hard one, as Go and
    nginx do, so a default ``ulimit -n`` of 1024 does not quietly cap max_connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # e.g. a seccomp filter without @resources
            log.warning("cannot raise open files limit", limit=soft, error=str(exc))
        else:
            log.info("open files limit raised", previous=soft, limit=hard)
    # Some descriptors are taken by the process itself: listening sockets, logs, the loop.
    if max_connections and hard != resource.RLIM_INFINITY and max_connections + 64 > hard:
        log.warning(
            "open files limit is below max_connections",
            limit=hard,
            max_connections=max_connections,
            hint="raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
        )
