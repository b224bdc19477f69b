"""The process runner: what the CLI adds around ``lifecycle.serve`` when wsechod owns
the process. It serves through ``runtime.run.run`` (the uvloop loop, the lifecycle, the
drain: the path ``serve_in_thread`` takes too), and around it raises the open-files limit,
captures the signals (turning SIGTERM/SIGINT into ``Lifecycle.request_stop``, the same
call an embedding program makes), tells systemd about readiness, reloads and the
watchdog, and makes sure the process ends.
"""

import asyncio
import contextlib
import functools
import os
import resource
import signal
import ssl
from collections.abc import Callable, Iterator

from wsechod._version import __version__
from wsechod.engine import Listener
from wsechod.log import get_logger
from wsechod.process import logs, systemd
from wsechod.process.workers.worker import Worker
from wsechod.runtime.lifecycle import (
    RELOAD_SIGNALS,
    STOP_SIGNALS,
    Lifecycle,
    capture_signals,
    drain_bound,
)
from wsechod.runtime.run import run as run_server
from wsechod.settings import Loaded, Settings, SettingsError, shown

log = get_logger("wsechod")

HANDLED_SIGNALS = {*STOP_SIGNALS, *RELOAD_SIGNALS}
STATUS_INTERVAL = 10.0  # seconds between STATUS= updates to systemd
# During a drain, EXTEND_TIMEOUT_USEC= every EXTEND_INTERVAL seconds, each asking systemd
# to wait EXTEND_BY more: a drain longer than TimeoutStopSec= is not killed while it is on
# schedule, and one that stalls (a wedged loop sends nothing) is.
EXTEND_INTERVAL = 2.0
EXTEND_BY = EXTEND_INTERVAL + 3.0

# Signals that arrived before the event loop could handle them.
_early_stops: list[str] = []
_early_reloads: list[str] = []


def catch_early_signals() -> None:
    """Until the loop runs: a first SIGTERM/SIGINT is kept and becomes a graceful stop as
    soon as the server is up; a second one ends start-up at once (it may be stuck, say on a
    name lookup). SIGHUP and SIGUSR1 are kept too and become one reload once the server is
    up: the settings may have changed since they were read (a worker forked just before
    a reload would otherwise keep the old ones). Signals that came before this (the entry
    point blocks them) are handled here too."""

    def early(signum: int, _: object) -> None:
        if signum in RELOAD_SIGNALS:
            _early_reloads[:] = [signal.Signals(signum).name]
            return
        if _early_stops:
            raise SystemExit(128 + signum)
        _early_stops.append(signal.Signals(signum).name)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, early)
    # The entry point blocked them until now: what came meanwhile is delivered here, to
    # the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def take_early_signals() -> tuple[list[str], list[str]]:
    """The stop and reload signals caught before a loop could handle them (a supervisor
    handles them itself rather than pass them to the workers it forks)."""
    taken = list(_early_stops), list(_early_reloads)
    _early_stops.clear()
    _early_reloads.clear()
    return taken


def _reload(
    notifier: systemd.Notifier,
    life: Lifecycle,
    reread: Callable[[], Loaded | None] | None,
    signame: str,
) -> None:
    """SIGHUP (or SIGUSR1, which logrotate configs written for nginx send): reopen the
    log file, so it can be moved without losing a line, and read the settings again:
    what can change live applies to new connections, the rest waits for a restart."""
    notifier.reloading()
    if logs.reopen():
        log.info("log file reopened", signal=signame)
    if reread is not None:
        _reload_settings(life, reread, signame)
    notifier.send(READY=1, STATUS=life.status())


def _reload_settings(life: Lifecycle, reread: Callable[[], Loaded | None], signame: str) -> None:
    """Apply the settings ``reread`` gives (a worker's: those its main process read, which
    said what was wrong with them when it gives None), and say what changed."""
    try:
        loaded = reread()
    except SettingsError as exc:
        log.error("settings not reloaded: the old ones stay", signal=signame, error=str(exc))
        return
    if loaded is None:
        return
    old = life.settings
    if loaded.settings.log_level != old.log_level:
        logs.set_level(loaded.settings.log_level)
    applied, kept = life.reload(loaded.settings)
    for key in applied:
        before, after = getattr(old, key), getattr(life.settings, key)
        log.info("setting changed", key=key, old=shown(key, before), new=shown(key, after))
    for key in kept:
        log.warning(
            "setting needs a restart",
            key=key,
            value=shown(key, getattr(loaded.settings, key)),
            kept=shown(key, getattr(old, key)),
        )
    for notice in loaded.notices:
        log.warning(notice.event, **notice.fields)
    if not applied and not kept:
        log.info("settings reloaded: nothing changed", signal=signame)


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


def drain_on_schedule(open_now: int, open_before: int, now: float, deadline: float) -> bool:
    """Whether a drain deserves more time from systemd: until its own deadline (after
    which the rest is cut), and after it for as long as connections still go away."""
    return now < deadline or open_now < open_before


async def _extend_drain(notifier: systemd.Notifier, life: Lifecycle) -> None:
    """sd_notify(3) EXTEND_TIMEOUT_USEC= while the drain is on schedule. systemd never
    shortens its own stop timeout for it, so a short drain loses nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_bound(life.settings)
    before: int | None = None  # open connections at the last extension
    while True:
        now = 0 if life.engine is None else len(life.engine.connections)
        if before is None or drain_on_schedule(now, before, loop.time(), deadline):
            usec = int(EXTEND_BY * 1e6)
            notifier.send(EXTEND_TIMEOUT_USEC=usec, STATUS=f"stopping: draining {now} connections")
            before = now
        await asyncio.sleep(EXTEND_INTERVAL)


REAP_INTERVAL = 1.0  # seconds between looks for exited orphans, as a container's init


@contextlib.contextmanager
def _process(
    life: Lifecycle,
    on_ready: Callable[[], None] | None,
    reread: Callable[[], Loaded | None] | None,
    *,
    worker: Worker | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Callable[[], None]]:
    """Around the serving (``runtime.run.run``'s ``attach``): the signals, systemd, and the
    daemon's parent waiting for ``on_ready``; a worker shares its figures."""
    loop = asyncio.get_running_loop()
    life.worker, life.tls = worker, tls
    notifier = systemd.Notifier()
    reporter: asyncio.Task[None] | None = None
    extender: asyncio.Task[None] | None = None

    serving = False

    def ready() -> None:
        nonlocal reporter, serving
        notifier.ready(life.status())
        if notifier.enabled:
            reporter = loop.create_task(_report(notifier, life))
        if on_ready is not None:
            on_ready()
        serving = True
        for name in _early_reloads:
            reload(name)
        _early_reloads.clear()

    def reload(signame: str) -> None:
        if serving:
            _reload(notifier, life, reread, signame)
        else:  # the server is being built from the settings of before: reload once up
            _early_reloads[:] = [signame]

    def stopping(_: object) -> None:
        nonlocal extender
        active = 0 if life.engine is None else len(life.engine.connections)
        notifier.send(STOPPING=1, STATUS=f"stopping: draining {active} connections")
        if notifier.enabled:
            extender = loop.create_task(_extend_drain(notifier, life))

    life.stop.add_done_callback(stopping)
    reaper = None
    if os.getpid() == 1 and worker is None:  # a container's init, serving alone
        reaper = loop.create_task(_reap_orphans())
    with capture_signals(life, reload):
        for name in _early_stops:  # sent while we were starting
            life.request_stop(name)
        _early_stops.clear()
        try:
            yield ready
        finally:
            # Stopped: later signals wait, unanswered, until the process exits (status 0)
            # rather than kill it with a traceback on the way out.
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
            for task in (reporter, extender):
                if task is not None:
                    task.cancel()
            notifier.close()
            if reaper is not None:
                reaper.cancel()


async def _reap_orphans() -> None:
    """As a container's init (PID 1), every orphan of the container is this process's
    child: one that exits stays a zombie until it is waited for; here within a second.
    (uvloop keeps SIGCHLD to itself; with workers, the supervisor waits for any child.)"""
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # noqa: ASYNC222 - WNOHANG: never waits
                pass
        await asyncio.sleep(REAP_INTERVAL)


def run(
    settings: Settings,
    listeners: list[Listener],
    on_ready: Callable[[], None] | None = None,
    handoff: bool = False,
    reread: Callable[[], Loaded | None] | None = None,
    *,
    worker: Worker | None = None,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Run the daemon in this process until it is stopped; returns the exit status.

    ``on_ready`` is called once the server is listening (the daemon's parent waits for it);
    ``handoff``: the sockets came from systemd socket activation; ``reread``: loads the
    settings again from the same sources, for a reload (a worker's gives those its main
    process read, or None: nothing to apply); ``worker``: this process is one of
    several workers (``process.workers``), sharing its figures through it; ``tls``:
    the certificate to serve with (the supervisor's) rather than the files read again.
    """
    log.info("starting", version=__version__, pid=os.getpid())
    _raise_open_files_limit(settings.max_connections)
    attach = functools.partial(_process, on_ready=on_ready, reread=reread, worker=worker, tls=tls)
    run_server(settings, listeners, handoff=handoff, attach=attach)
    log.info("stopped")
    return 0


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
