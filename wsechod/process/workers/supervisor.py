"""Several workers (``workers = N``): the main process forks them, keeps them running, and
speaks for them.

The listening sockets are bound before (each TCP listener once per worker, with
SO_REUSEPORT; unix sockets and systemd's are shared), then each worker is forked with no
event loop in the parent: it builds its own uvloop loop and runs what a single process
runs (``runner.run``), serving its sockets. The main process never serves a client. It
is a small loop on ``sigwaitinfo``: with its signals blocked, each one is handled in turn,
synchronously, and an interval timer (SIGALRM) wakes it for the next thing due (a render
of the shared page, a restart, a notification to systemd). It

- restarts a worker that exits (BACKOFF_FIRST doubling to BACKOFF_MAX; back to the first
  once a worker has lived BACKOFF_RESET), with a rate-limited warning; one told to stop
  alone (a SIGTERM to it) is replaced as soon as it starts its drain, on the same sockets,
  which it stops accepting on;
- forwards SIGTERM/SIGINT (a second one forces, as in each worker), SIGHUP and SIGUSR1,
  and exits 0 once the last worker has;
- owns the pidfile, sd_notify (READY=1 once every worker listens, STATUS, STOPPING,
  WATCHDOG) and the daemon's readiness;
- renders the whole daemon's ``/metrics`` page and health (``scoreboard``, ``totals``).

A worker asks to be sent SIGTERM when the main process dies (PR_SET_PDEATHSIG), checks
that its parent is still the one that forked it, and checks again every second; it then
drains like any stop. Workers get process groups of their own, so that a terminal's
Ctrl-C reaches the main process only and each worker hears one stop, forwarded.
"""

import contextlib
import dataclasses
import os
import signal
import ssl
import time
from collections.abc import Callable

from wsechod import ratelimit
from wsechod._version import __version__
from wsechod.engine.addresses import format_address
from wsechod.log import get_logger
from wsechod.process import logs, runner, systemd
from wsechod.process.workers import child, signals, steering
from wsechod.process.workers.restarts import BACKOFF_MAX, Slot, backoff
from wsechod.process.workers.scoreboard import (
    DRAINING,
    LISTENING,
    LOOK,
    PUBLISH_INTERVAL,
    RECYCLED,
    RECYCLING,
    RENDER_INTERVAL,
    STOPPED,
    Scoreboard,
)
from wsechod.process.workers.totals import Totals
from wsechod.runtime import lifecycle, listeners, tls
from wsechod.settings import Loaded, Settings, SettingsError

log = get_logger("wsechod")

# A worker whose figures have not been refreshed for this long (and for at least the
# systemd watchdog's interval) has a wedged loop: it is killed and replaced. Without the
# systemd watchdog, nothing watches for that, as with one process.
STALL_MIN = 3 * PUBLISH_INTERVAL


class WorkerError(Exception):
    """A worker could not start; the message is one line for the operator."""


def run(
    settings: Settings,
    bound: listeners.Bound,
    on_ready: Callable[[], None] | None,
    handoff: bool,
    reread: Callable[[], Loaded] | None,
) -> int:
    """Serve with ``settings.workers`` processes until stopped; the exit status. Raises
    WorkerError if a worker exits before every worker listens."""
    return Supervisor(settings, bound, on_ready, handoff, reread).run()


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        bound: listeners.Bound,
        on_ready: Callable[[], None] | None,
        handoff: bool,
        reread: Callable[[], Loaded] | None,
    ) -> None:
        self.settings = settings
        self.bound = bound
        self.on_ready = on_ready
        self.handoff = handoff
        self.reread = reread
        self.count = settings.workers
        self.pid = os.getpid()
        self.scoreboard = Scoreboard(self.count)
        # Warnings that may repeat (exits, unreadable figures): this process has no event
        # loop to time what they hold back, its own loop does (see _next_due).
        self.warn = ratelimit.RateLimitedLog(log, polled=True)
        self.totals = Totals(self.scoreboard, self.pid, self.warn)
        self.totals.recyclable = self._recyclable
        self.slots = [Slot(i) for i in range(self.count)]
        self.notifier = systemd.Notifier()
        self.stops = 0
        self.stopped_at = 0.0
        self.ready = False
        self.failure: str | None = None
        self.mask: set[int | signal.Signals] = set()
        self.due: dict[str, float] = {}
        self.extended: int | None = None  # open connections at the last extension
        self.addresses: list[str] = []
        self.tls: ssl.SSLContext | None = None
        self.killed: set[int] = set()  # pids killed for not responding
        # New connections go to the workers that accept (None: the kernel refused it).
        self.steering: steering.Steering | None = steering.Steering(bound.reuseport, self.count)
        for sock in bound.sockets:  # one per address, in order (TCP copies share one)
            name = format_address(sock.getsockname())
            if name not in self.addresses:
                self.addresses.append(name)
        usec = self.notifier.watchdog_interval
        self.stall = None if usec is None else max(2 * usec, STALL_MIN)

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        log.info("starting", version=__version__, pid=self.pid, workers=self.count)
        # Unreadable TLS files: one error, here. Workers, also those started again later,
        # serve with this context (and the one each reload reads), not the files of then.
        self.tls = lifecycle.tls_context(self.settings)
        # An inherited "ignore SIGCHLD" would have the kernel reap the workers unseen.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals.SIGNALS)
        try:
            stops, reloads = runner.take_early_signals()
            self.totals.render()
            for slot in self.slots:
                self._start(slot)
            for name in stops:  # sent while we were starting: the workers stop once up
                self._stop(name)
            for name in reloads:  # and reload once up
                self._reload(signal.Signals[name])
            self.due["render"] = time.monotonic() + RENDER_INTERVAL
            while self.stops == 0 or any(s.pid or s.recycled for s in self.slots):
                signum = signals.wait(max(0.0, min(self._next_due()) - time.monotonic()))
                if signum is not None:
                    self._signal(signum)
                self._run_due()
                self._steer()
        finally:
            self.notifier.close()
            self.warn.flush()
        if self.failure is not None:
            raise WorkerError(self.failure)
        log.info("stopped", workers=self.count)
        return 0

    def _next_due(self) -> list[float]:
        held = self.warn.due()
        return [
            *self.due.values(),
            *(s.due for s in self.slots if s.due is not None),
            *([] if held is None else [held]),
        ]

    def _run_due(self) -> None:
        self.warn.flush_due()
        now = time.monotonic()
        for slot in self.slots:
            if slot.due is not None and slot.due <= now:
                slot.due = None
                self._start(slot)
                if slot.pid is not None:
                    self.totals.restarts += 1
        for name, when in list(self.due.items()):
            if when <= now:
                del self.due[name]
                getattr(self, f"_{name}")()

    def _signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGCHLD:
            self._reap()
        elif signum == LOOK:
            self._look()
        elif signum in lifecycle.STOP_SIGNALS:
            self._stop(name)
        elif signum in lifecycle.RELOAD_SIGNALS:
            self._reload(signum)

    def _steer(self) -> None:
        """New connections to the workers that accept now, at once when that changes (an
        exit reaped, a look signal, a recycle; a drain seen at a render): ``steering``. Not
        while the daemon starts (a worker that exits then fails the start) or stops."""
        if self.stops or not self.ready or self.steering is None:
            return
        live = [slot.index for slot in self.slots if self._accepting(slot)]
        try:
            changed = self.steering.update(live)
        except OSError as exc:
            log.warning(
                "cannot steer new connections to the workers that accept",
                error=exc.strerror or str(exc),
            )
            self.steering = None
            return
        if changed:
            log.info("new connections steered", workers=list(self.steering.live))

    def _accepting(self, slot: Slot) -> bool:
        """The worker in ``slot`` listens and does not drain."""
        if slot.pid is None or not slot.listening:
            return False
        entry = self.scoreboard.read(self.scoreboard.slot_of(slot.index, slot.gen))
        return entry is None or entry.gen != slot.gen or entry.state == LISTENING

    # --- timers ---------------------------------------------------------------------------

    def _render(self) -> None:
        """The shared page and health; a look at the scoreboard (a look signal may have been
        missed: a worker preempted while writing its slot); a worker that stopped
        refreshing its figures has a wedged loop: kill it (it is replaced)."""
        self.due["render"] = time.monotonic() + RENDER_INTERVAL
        self._look()
        self.totals.render()
        if self.stall is None:
            return
        now = time.monotonic()
        for at, entry in self.totals.live.items():
            worker = self.slots[at // 2]
            if entry.gen == worker.gen:
                pid = worker.pid if worker.listening else None
            else:  # the one it replaced, if it still drains
                pid = (
                    worker.recycled[0]
                    if worker.recycled and worker.recycled[1] == entry.gen
                    else None
                )
            silent = now - entry.updated
            if pid and pid not in self.killed and silent > self.stall:
                self.killed.add(pid)
                log.error(
                    "worker not responding: killed",
                    worker=worker.index,
                    pid=pid,
                    silent_for=round(silent, 1),
                )
                self._kill(pid, signal.SIGKILL)

    def _notify(self) -> None:
        """STATUS=, and WATCHDOG=1 while some worker serves: with none, systemd's watchdog
        restarts the whole service."""
        interval = min(
            self.notifier.watchdog_interval or runner.STATUS_INTERVAL, runner.STATUS_INTERVAL
        )
        self.due["notify"] = time.monotonic() + interval
        if self.notifier.watchdog_interval is not None and self.totals.running:
            self.notifier.send(WATCHDOG=1, STATUS=self.status())
        else:
            self.notifier.send(STATUS=self.status())

    def _extend(self) -> None:
        """During the drain, EXTEND_TIMEOUT_USEC= while it is on schedule (as runner)."""
        self.due["extend"] = time.monotonic() + runner.EXTEND_INTERVAL
        open_now = self.connections()
        deadline = self.stopped_at + lifecycle.drain_bound(self.settings)
        before = self.extended
        if before is None or runner.drain_on_schedule(open_now, before, time.monotonic(), deadline):
            self.notifier.send(
                EXTEND_TIMEOUT_USEC=int(runner.EXTEND_BY * 1e6),
                STATUS=f"stopping: draining {open_now} connections",
            )
            self.extended = open_now

    # --- signals --------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cpu = usage.ru_utime + usage.ru_stime
            self.killed.discard(pid)
            for slot in self.slots:
                if slot.pid == pid:
                    self._exited(slot, status, cpu)
                elif slot.recycled is not None and slot.recycled[0] == pid:
                    self._recycled_exited(slot, status, cpu)

    def _exited(self, slot: Slot, status: int, cpu: float) -> None:
        pid, slot.pid = slot.pid, None
        self._steer()  # first: newcomers to the others, before the figures and the log
        if slot.listening:  # counted as running
            self.totals.running -= 1
        self._look()  # it may have listened before its look signal was answered (not counted)
        last = self.scoreboard.read(self.scoreboard.slot_of(slot.index, slot.gen))
        self.totals.retire(slot.index, slot.gen, cpu)
        code = os.waitstatus_to_exitcode(status)
        how = {"exit_status": code} if code >= 0 else {"signal": signals.name(-code)}
        reason = f"exit status {code}" if code >= 0 else f"killed by {signals.name(-code)}"
        drained = last is not None and last.gen == slot.gen and last.state in (STOPPED, RECYCLED)
        if code == 0 and drained and not self.stops:
            # Told to stop alone, and drained before it could be replaced (or while the
            # one it replaced still drained, or before the daemon was ready: a worker that
            # drained has listened): started again at once, not as a crash.
            log.info("worker drained", worker=slot.index, pid=pid)
            slot.due = time.monotonic()
        elif self.stops:
            if code != 0:
                log.warning("worker exited during the stop", worker=slot.index, pid=pid, **how)
        elif not self.ready and not slot.listening:
            self.failure = f"worker {slot.index} exited during start-up ({reason}); see its log"
            log.error("worker exited during start-up", worker=slot.index, pid=pid, **how)
            self._stop("start-up failed")
        else:
            now = time.monotonic()
            delay, slot.backoff = backoff(slot.backoff, now - slot.started)
            slot.due = now + delay
            self.warn.warning(
                "worker exited", reason=reason, worker=slot.index, pid=pid, restart_in=delay, **how
            )
        self.totals.render()

    def _recycled_exited(self, slot: Slot, status: int, cpu: float) -> None:
        """A worker that drained alone (another serves in its place) exited."""
        assert slot.recycled is not None
        pid, gen = slot.recycled
        slot.recycled = None
        self.totals.retire(slot.index, gen, cpu)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            log.info("worker drained", worker=slot.index, pid=pid)
        else:
            how = {"exit_status": code} if code >= 0 else {"signal": signals.name(-code)}
            log.warning("worker exited during its drain", worker=slot.index, pid=pid, **how)
        self.totals.render()

    def _look(self) -> None:
        """The look signal: which workers listen now (once all do, the daemon is ready), and
        which one leaves alone (another is started in its place at once)."""
        changed = False
        for slot in self.slots:
            if slot.gen == 0:
                continue
            entry = self.scoreboard.read(self.scoreboard.slot_of(slot.index, slot.gen))
            if entry is None or entry.gen != slot.gen:
                continue
            if not slot.listening and entry.state >= LISTENING:
                slot.listening = changed = True
                if slot.pid is not None:  # else: exited already, not counted as running
                    self.totals.running += 1
            leaves = entry.state in (RECYCLING, RECYCLED) and slot.pid is not None
            if leaves and not self.stops and slot.recycled is None:
                self._replace(slot)
                changed = True
        if not changed:
            return
        became_ready = not self.ready and all(s.listening and s.pid for s in self.slots)
        self.ready = self.ready or became_ready
        self.totals.render()  # with ready set: from now on, workers may be recycled alone
        if became_ready:
            pids = [slot.pid for slot in self.slots]
            log.info("workers ready", workers=self.count, pids=pids, addresses=self.addresses)
            self.notifier.ready(self.status())
            if self.notifier.enabled:
                self._notify()
            if self.on_ready is not None:
                self.on_ready()

    def _draining(self, slot: Slot) -> bool:
        """The worker drains already (told to stop alone, say by a ``pkill`` that reached
        every process): the daemon's stop must not reach it as a second one."""
        entry = self.scoreboard.read(self.scoreboard.slot_of(slot.index, slot.gen))
        return entry is not None and entry.gen == slot.gen and entry.state >= DRAINING

    def _recyclable(self) -> list[int]:
        """The workers that may be recycled alone now (``Worker.recycling``): the daemon is
        up and does not stop, and the one before them no longer drains (it and a third
        would need a third slot on the scoreboard)."""
        if not self.ready or self.stops:
            return []
        return [s.pid for s in self.slots if s.listening and s.pid and s.recycled is None]

    def _replace(self, slot: Slot) -> None:
        """Worker ``slot`` was told to stop, alone: it drains, no longer accepting, and
        another takes its sockets now (newcomers wait in their backlog meanwhile)."""
        assert slot.pid is not None
        slot.recycled = (slot.pid, slot.gen)
        log.info("worker draining: starting another", worker=slot.index, pid=slot.pid)
        slot.pid = None
        if slot.listening:
            self.totals.running -= 1
        self._start(slot)
        if slot.pid is not None:
            self.totals.restarts += 1

    def _stop(self, reason: str) -> None:
        """First: every worker drains (and nothing is restarted); second: they stop now."""
        self.stops += 1
        if self.stops == 1:
            self.stopped_at = time.monotonic()
            self.totals.stopping = True
            connections = self.connections()
            log.info("stop requested", reason=reason, workers=self.count, connections=connections)
            self.notifier.send(STOPPING=1, STATUS=f"stopping: draining {connections} connections")
            for slot in self.slots:
                slot.due = None
            # The workers hold their own: these copies were kept to start workers again.
            self.bound.close()
            if self.notifier.enabled:
                self._extend()
        elif self.stops == 2:
            log.warning("stopping now", reason=reason, workers=self.count)
        else:
            return
        self.totals.render()  # first: a worker hearing the stop reads that the daemon stops
        for slot in self.slots:
            if slot.pid is not None and (self.stops == 2 or not self._draining(slot)):
                self._kill(slot.pid, signal.SIGTERM)
            if slot.recycled is not None and self.stops == 2:  # draining already: cut it
                self._kill(slot.recycled[0], signal.SIGTERM)

    def _reload(self, signum: int) -> None:
        """Reopen our log, read the settings once for every worker (our log level and
        drain deadline too), hand them down through the scoreboard before the signal goes on
        to every worker: each applies them and reports what it did."""
        name = signal.Signals(signum).name
        if self.ready:  # before that, systemd waits for READY=1 of the start
            self.notifier.reloading()
        if logs.reopen():
            log.info("log file reopened", signal=name)
        if self.reread is not None and not self.scoreboard.hand_down(self._reread(name)):
            log.error(
                "settings not reloaded: the old ones stay",
                signal=name,
                error="too large to hand to the workers",
            )
            self.scoreboard.hand_down(None)
        for slot in self.slots:
            for pid in (slot.pid, slot.recycled and slot.recycled[0]):
                if pid:
                    self._kill(pid, signum)
        if self.ready:
            self.notifier.send(READY=1, STATUS=self.status())

    def _reread(self, signame: str) -> Loaded | None:
        """The settings again, for the workers (None: they stay as they are); a bad file
        and the warnings about the settings are said here, once for the daemon."""
        assert self.reread is not None
        try:
            loaded = self.reread()
        except SettingsError as exc:
            log.error("settings not reloaded: the old ones stay", signal=signame, error=str(exc))
            return None
        for notice in loaded.notices:
            log.warning(notice.event, **notice.fields)
        settings = loaded.settings
        if settings.log_level != self.settings.log_level:
            logs.set_level(settings.log_level)
        # What needs a restart stays as it was, for the workers started later too.
        restart = lifecycle.kept_on_reload(self.settings, settings)
        merged = dataclasses.replace(settings, **{k: getattr(self.settings, k) for k in restart})
        try:
            self.tls = lifecycle.tls_context(merged)
        except tls.TlsError:  # each worker logs why; the certificate stays as it was
            before = {key: getattr(self.settings, key) for key in lifecycle.TLS_KEYS}
            merged = dataclasses.replace(merged, **before)
        self.settings = merged
        return dataclasses.replace(loaded, notices=())

    # --- workers --------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        slot.gen += 1
        if slot.recycled is not None and slot.recycled[1] % 2 == slot.gen % 2:
            slot.gen += 1  # the other of its two slots: the one draining publishes in this one
        slot.listening = False
        self.scoreboard.write(self.scoreboard.slot_of(slot.index, slot.gen), b"", gen=slot.gen)
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot start a worker", worker=slot.index, error=exc.strerror)
            if not self.ready:
                self.failure = f"cannot start a worker: {exc.strerror}"
                self._stop("start-up failed")
            else:
                slot.due = time.monotonic() + BACKOFF_MAX
            return
        if pid == 0:
            child.serve(self, slot)
        slot.pid = pid
        slot.started = time.monotonic()

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # exited: SIGCHLD says so
            os.kill(pid, signum)

    # --- figures --------------------------------------------------------------------------

    def connections(self) -> int:
        return int(self.totals.total.gauges.get("connections_open", 0))

    def status(self) -> str:
        """systemd's STATUS=, as one process says it, plus the workers."""
        return lifecycle.status_line(
            self.settings.mode,
            self.addresses,
            self.connections(),
            draining=bool(self.stops),
            workers=(self.totals.running, self.count),
        )
