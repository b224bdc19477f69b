"""The one owner of start, stop and every shutdown deadline.

``serve()`` runs in three plain phases: start (application, broker, engine, listening),
serve until ``Lifecycle.stop`` resolves, then drain. Whatever asks for the stop (a
signal, an embedding program, a supervisor) calls ``request_stop``; nothing polls a
flag. The second call resolves ``force`` and cuts the drain short.

Nothing here knows of pidfiles, daemons or systemd: the process runner
(``wsechod.process.runner``) or an embedding program gives the sockets and hears about
readiness through a callback.
"""

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from wsechod import brokers, ratelimit
from wsechod.apps.echo import Echo
from wsechod.apps.peer import TestPeer
from wsechod.apps.relay import Relay
from wsechod.engine import Admission, Application, Engine, Listener, Options, Reply
from wsechod.engine.frames import CloseCode
from wsechod.http.admission import admission
from wsechod.log import get_logger
from wsechod.runtime import memory, metrics, tls
from wsechod.settings import RESTART_KEYS, Settings, changes

log = get_logger("wsechod")

SHUTDOWN_CODE, SHUTDOWN_REASON = CloseCode.GOING_AWAY, "server shutting down"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
HANDSHAKE_GRACE = 0.2  # seconds a connection accepted at the very end has to ask
BROKER_CLOSE_TIMEOUT = 1.0  # seconds the broker gets to unsubscribe, within the drain
TLS_KEYS = ("tls_cert", "tls_key", "tls_ca")  # kept together when the files cannot be used


def drain_bound(settings: Settings) -> float:
    """The longest a drain lasts from the stop: ``drain_timeout``, then the grace of the
    handshakes accepted at the very end, and the broker's close. What a stop waits for
    before it cuts (``ThreadedServer.stop``), and systemd's extensions are measured by."""
    return settings.drain_timeout + HANDSHAKE_GRACE + BROKER_CLOSE_TIMEOUT


@dataclass(frozen=True, slots=True)
class DrainReport:
    connections: int
    force_closed: int
    duration: float


class Worker(Protocol):
    """This process as one worker of several (``wsechod.process.workers``): what the
    lifecycle asks of the scoreboard they share. The supervisor's side hands it in; a single
    or embedded server has none. (A protocol, so that nothing here imports the process
    part.)"""

    def attach(self, engine: Engine, app: Application) -> None:
        """Serving: publish this worker's figures from now on."""

    def recycling(self) -> bool:
        """Starting to drain: whether this worker is recycled alone (it then stops
        accepting, for the one started in its place)."""

    def page(self) -> Reply:
        """The whole daemon's /metrics page."""

    def degraded(self, app: Application) -> str | None:
        """What /healthz reports missing, for the whole daemon."""

    def daemon_draining(self) -> bool:
        """Whether the daemon stops (not this worker alone)."""


class Lifecycle:
    """The stop future, and a second one that cuts the drain short ("stop now")."""

    def __init__(self, settings: Settings) -> None:
        loop = asyncio.get_running_loop()
        self.settings = settings  # those in force; a reload replaces them
        self.stop: asyncio.Future[str] = loop.create_future()
        self.force: asyncio.Future[str] = loop.create_future()
        self.engine: Engine | None = None  # set once serving
        self.app: Application | None = None
        self.handoff = False  # the sockets belong to systemd: stop accepting at once
        # One of several workers: /metrics and /healthz answer for the whole daemon.
        self.worker: Worker | None = None
        self.tls: ssl.SSLContext | None = None  # a certificate loaded already, to serve with

    def request_stop(self, reason: str) -> None:
        """First call: drain gracefully. Second call: end the drain at once."""
        if not self.stop.done():
            self.stop.set_result(reason)
            self._stop_accepting()
        elif not self.force.done():
            self.force.set_result(reason)

    def attach(self, engine: Engine, app: Application, handoff: bool) -> None:
        """The engine is listening: from now on a stop reaches it (and one requested
        during the start reaches it now)."""
        self.engine, self.app, self.handoff = engine, app, handoff
        if self.stop.done():
            self._stop_accepting()

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Apply what can change live (for new connections); keep the rest as it is.
        Returns the keys applied and those that need a restart."""
        old = self.settings
        changed = changes(old, new)
        restart = kept_on_reload(old, new)
        kept = [key for key in changed if key in restart]
        applied = [key for key in changed if key not in restart]
        self.settings = dataclasses.replace(new, **{k: getattr(self.settings, k) for k in kept})
        if self.engine is not None:
            try:
                new_options = options(self.settings)  # certificates read again, even unchanged
            except tls.TlsError as exc:  # changed since the settings were checked: keep
                log.error("tls certificate not reloaded: the old one stays", error=str(exc))
                before = {key: getattr(old, key) for key in TLS_KEYS}
                self.settings = dataclasses.replace(self.settings, **before)
                applied = [key for key in applied if key not in TLS_KEYS]
                new_options = options(self.settings, self.engine.options.tls)
            else:
                if new_options.tls is not None:
                    log.info("tls certificate loaded", tls_cert=self.settings.tls_cert)
            self.engine.reconfigure(new_options)
        if isinstance(self.app, Relay):
            self.app.configure(**relay_options(self.settings))
        return applied, kept

    def _stop_accepting(self) -> None:
        """What must not wait for the next loop pass, done before anyone hears of the
        stop: ``/healthz`` turns 503, and systemd's sockets stop being accepted so that
        newcomers stay in the backlog for the next process; so do a worker's when it stops
        alone, for the worker started in its place."""
        if self.engine is not None:
            self.engine.draining = True
            recycled = self.worker is not None and self.worker.recycling()
            if self.handoff or recycled:
                self.engine.stop_accepting()

    def status(self) -> str:
        """systemd's STATUS= (``status_line``)."""
        if self.engine is None:
            return "starting"
        engine = self.engine
        return status_line(
            self.settings.mode, engine.addresses, len(engine.connections), draining=engine.draining
        )


def status_line(
    mode: str,
    addresses: Sequence[str],
    connections: int,
    *,
    draining: bool,
    workers: tuple[int, int] | None = None,
) -> str:
    """One human line (systemd's STATUS=), for one process or a daemon of several: what
    it does, where, how many are connected; with ``workers`` (running, of how many),
    whether some are missing."""
    line = (
        f"{'draining' if draining else mode} on {', '.join(addresses)}: {connections} connections"
    )
    if workers is None:
        return line
    running, count = workers
    return f"{line} ({'' if running == count else f'{running} of '}{count} workers)"


def kept_on_reload(old: Settings, new: Settings) -> frozenset[str]:
    """The keys a reload keeps as they are (the supervisor's for workers it starts later,
    and each serving process's): those only a restart applies, and the TLS files when the
    reload would turn TLS on or off, since whether listeners speak TLS is decided when
    they start accepting (a reload renews the certificate)."""
    toggled = bool(old.tls_cert) != bool(new.tls_cert)
    return RESTART_KEYS | frozenset(TLS_KEYS) if toggled else RESTART_KEYS


@contextlib.contextmanager
def capture_signals(life: Lifecycle, reload: Callable[[str], None] | None = None) -> Iterator[None]:
    """SIGTERM/SIGINT request the stop (twice: force it); SIGHUP/SIGUSR1 call ``reload``.
    The handlers that were there before are put back on exit. Only a process that owns
    its signals (the CLI) uses this; an embedding program stops through ``request_stop``.
    """
    loop = asyncio.get_running_loop()
    handled = [*STOP_SIGNALS, *(RELOAD_SIGNALS if reload is not None else ())]
    previous = {sig: signal.getsignal(sig) for sig in handled}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, life.request_stop, sig.name)
    if reload is not None:
        for sig in RELOAD_SIGNALS:
            loop.add_signal_handler(sig, reload, sig.name)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


def options(settings: Settings, loaded: ssl.SSLContext | None = None) -> Options:
    """The engine's options; with TLS, the context ``loaded`` already, or else one freshly
    read from the files (TlsError if they cannot be used)."""
    return Options(
        max_size=settings.max_size,
        write_limit=settings.write_limit,
        open_timeout=settings.open_timeout,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        close_timeout=settings.close_timeout,
        compression=settings.compression == "deflate",
        compression_context=settings.mode != "relay",
        inflate_rate=settings.inflate_rate,
        tls=loaded if loaded is not None and settings.tls_cert else tls_context(settings),
        trusted_proxies=tuple(
            ipaddress.ip_network(n) for n in settings.trusted_proxies if n != "unix"
        ),
        trust_unix="unix" in settings.trusted_proxies,
        ipv6_prefix_length=settings.ipv6_prefix_length,
        max_connections_per_ip=settings.max_connections_per_ip,
        memory_limit=settings.memory_limit or memory.auto_limit(settings.workers),
        access_log=settings.access_log,
        backlog=settings.backlog,
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    return tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)


def application(settings: Settings) -> tuple[Application, brokers.Broker | None]:
    if settings.mode != "relay":
        return (TestPeer(settings.max_size) if settings.controls else Echo()), None
    broker = brokers.create(
        settings.broker,
        presence_interval=settings.presence_interval,
        history_memory=settings.history_memory,
        sentinels=settings.redis_sentinels,
        sentinel_service=settings.redis_sentinel_service,
        sentinel_password=settings.redis_sentinel_password,
        cluster=settings.redis_cluster,
    )
    return Relay(broker, **relay_options(settings)), broker


def relay_options(settings: Settings) -> dict[str, Any]:
    return {
        "echo": settings.relay_echo,
        "write_limit": settings.write_limit,
        "max_size": settings.max_size,
        "max_channels": settings.max_channels,
        "max_channel_members": settings.max_channel_members,
        "max_path_length": settings.max_path_length,
        "slow_consumer": settings.slow_consumer,
        "slow_consumer_timeout": settings.slow_consumer_timeout,
        "publish_rate": settings.publish_rate,
        "history_size": settings.history_size,
        "history_ttl": settings.history_ttl,
        "channel_rules": settings.channel,
        "controls": settings.controls,
    }


async def serve(
    listeners: list[Listener],
    life: Lifecycle,
    *,
    handoff: bool = False,
    ready: Callable[[], None] | None = None,
) -> DrainReport:
    """Serve ``life.settings`` on ``listeners`` until ``life.stop`` resolves, then drain."""
    # Start.
    settings = life.settings
    # First: TLS files this user cannot read stop it here (a worker is handed the main
    # process's context: files being replaced do not stop a replacement worker).
    engine_options = options(settings, life.tls)
    app, broker = application(settings)
    engine: Engine | None = None
    try:
        if broker is not None:
            assert isinstance(app, Relay)
            await broker.start(app.deliver, app.presence)
        engine = Engine(engine_options, app)
        engine.set_admission(_admission(engine, app, life))
        await engine.listen(listeners)
        life.attach(engine, app, handoff)
        if life.worker is not None:
            life.worker.attach(engine, app)
        # tls: which of the addresses speak TLS (wss://, https://); all of them or none.
        tls = engine.addresses if engine_options.tls is not None else []
        log.info(
            "listening",
            addresses=engine.addresses,
            tls=tls,
            roles=[sorted(roles) for roles in engine.roles],
            mode=settings.mode,
            pid=os.getpid(),
        )
        if ready is not None:
            ready()
    except BaseException:
        # A start that fails half-way leaves nothing running: an embedding program's
        # loop goes on after it (``running``), a broker task would too.
        if engine is not None:
            engine.stop_accepting()
            engine.abort_all()  # accepted meanwhile: nothing goes on after a failed start
            engine.budget.stop()
        if broker is not None:
            await _close_broker(broker)
        raise

    # Serve.
    reason = await life.stop

    # Drain.
    started = time.monotonic()
    settings = life.settings  # a reload may have changed the deadlines
    log.info(
        "stop requested",
        reason=reason,
        connections=len(engine.connections),
        drain_timeout=settings.drain_timeout,
    )
    life.force.add_done_callback(
        lambda f: log.warning(
            "stopping now", reason=f.result(), connections=len(engine.connections)
        )
    )
    closing = None if broker is None else asyncio.ensure_future(_close_broker(broker))
    closed = engine.close_all(SHUTDOWN_CODE, SHUTDOWN_REASON)
    await engine.wait_closed(settings.drain_timeout, life.force)
    engine.close_sockets()
    if not life.force.done():
        grace = min(HANDSHAKE_GRACE, settings.open_timeout or HANDSHAKE_GRACE)
        await engine.finish_handshakes(grace)
    cut = engine.abort_all()
    await asyncio.sleep(0)  # the cut connections' connection_lost: their counts are logged
    if closing is not None:
        await closing
    report = DrainReport(closed, cut, time.monotonic() - started)
    ratelimit.flush_all()
    totals = dict(engine.stats) | ({} if not isinstance(app, Relay) else app.stats)
    log.info(
        "drained",
        duration=round(report.duration, 3),
        connections=report.connections,
        force_closed=report.force_closed,
        **totals,
    )
    return report


def _admission(engine: Engine, app: Application, life: Lifecycle) -> Admission:
    """What a request gets before the upgrade; a worker answers /metrics and /healthz for
    the whole daemon."""
    worker = life.worker
    publisher = app if isinstance(app, Relay) else None
    if worker is None:
        return admission(
            engine,
            app,
            lambda: life.settings,
            metrics=metrics.exporter(engine, app),
            publisher=publisher,
        )
    return admission(
        engine,
        app,
        lambda: life.settings,
        metrics=worker.page,
        degraded=functools.partial(worker.degraded, app),
        draining=worker.daemon_draining,
        publisher=publisher,
    )


async def _close_broker(broker: brokers.Broker) -> None:
    """Cross-instance relay ends with the stop (dropping the connection unsubscribes); it
    gets a bounded time, inside the drain."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(broker.close(), BROKER_CLOSE_TIMEOUT)
