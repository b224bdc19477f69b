"""The main process's side of the scoreboard: it adds up the workers' figures, keeps what
exited workers had counted, and renders the daemon's /metrics page and health for whichever
worker is asked."""

import collections
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsechod import ratelimit
from wsechod.log import get_logger
from wsechod.process.workers.scoreboard import DRAINING, LISTENING, Daemon, Entry, Scoreboard
from wsechod.runtime import metrics
from wsechod.runtime.metrics import Snapshot

log = get_logger("wsechod")


class Totals:
    """The main process's side: adds up the workers' slots, keeps what exited workers had
    counted (so that counters never go back when a worker is replaced), and renders the
    page and the health for the workers to serve."""

    def __init__(
        self, scoreboard: Scoreboard, main_pid: int, warn: ratelimit.RateLimitedLog | None = None
    ) -> None:
        self.scoreboard = scoreboard
        self.main_pid = main_pid
        # Figures a worker wrote that cannot be parsed (which only a bug of ours can do):
        # an error, rate-limited (the supervisor's, polled by its loop).
        self.warn = warn or ratelimit.RateLimitedLog(log, polled=True)
        self.retired: collections.Counter[str] = collections.Counter()
        self.retired_gen = [0] * scoreboard.worker_slots  # per slot: the last start (gen) added up
        self.cpu_gone = 0.0  # CPU seconds of the workers that exited (from wait4)
        self.restarts = 0
        self.running = 0  # workers listening now (the supervisor keeps it)
        self.stopping = False
        self.recyclable: Callable[[], Iterable[int]] = tuple  # pids that may be recycled now
        self.live: dict[int, Entry] = {}
        # Per slot, the last entry that could be read: a slot caught mid-write (its
        # worker preempted while publishing) stands for itself with it, so that no total
        # goes back for a moment (Prometheus would take that for a reset).
        self.last: dict[int, Entry] = {}
        self.total = Snapshot()
        self._registry = CollectorRegistry()
        self._registry.register(_TotalsCollector(self))

    def retire(self, index: int, gen: int, cpu: float) -> None:
        """Worker ``index`` (its start ``gen``) exited: what it counted becomes retired,
        from its last publication; its gauges go with it."""
        slot = self.scoreboard.slot_of(index, gen)
        entry = self.scoreboard.read(slot) or self.last.get(slot)
        if entry is not None and entry.gen == gen and entry.body:
            try:
                self.retired.update(Snapshot.from_json(entry.body).counters)
            except (ValueError, KeyError, TypeError) as exc:
                self._unreadable(slot, entry, exc, "its counts are lost")
        self.last.pop(slot, None)
        self.retired_gen[slot] = max(self.retired_gen[slot], gen)
        self.cpu_gone += cpu

    def render(self) -> Snapshot:
        """Add up, write the page and the health; returns the total (for systemd)."""
        self.live = {}
        snaps = [Snapshot(counters=dict(self.retired))]
        for slot in range(self.scoreboard.worker_slots):
            entry = self.scoreboard.read(slot)
            if entry is None:
                entry = self.last.get(slot)
            else:
                self.last[slot] = entry
            if entry is None or entry.gen <= self.retired_gen[slot]:
                continue
            self.live[slot] = entry
            if entry.body:
                try:
                    snap = Snapshot.from_json(entry.body)
                except (ValueError, KeyError, TypeError) as exc:
                    self._unreadable(slot, entry, exc, "left out of the page")
                    continue
                if entry.state >= DRAINING and not self.stopping:
                    # A worker recycled closes its broker: not the daemon's trouble.
                    snap.degraded = None
                    for family in snap.families:  # states, such as "connected"
                        if family.merge == "min":
                            snap.gauges.pop(family.name, None)
                snaps.append(snap)
        self.total = metrics.merge(snaps)
        self.total.gauges["draining"] = int(self.stopping)  # not a worker that drains alone
        for gauge in ("connections_open", "handshakes_pending"):
            self.total.gauges.setdefault(gauge, 0)
        self.scoreboard.write(self.scoreboard.page_slot, generate_latest(self._registry))
        problems = [self.total.degraded] if self.total.degraded else []
        missing = self.scoreboard.workers - self.running
        if missing and not self.stopping:
            problems.append(f"{missing} of {self.scoreboard.workers} workers not running")
        daemon = Daemon("; ".join(problems) or None, frozenset(self.recyclable()))
        state = DRAINING if self.stopping else LISTENING
        self.scoreboard.write(self.scoreboard.daemon_slot, daemon.to_json(), state=state)
        return self.total

    def _unreadable(self, slot: int, entry: Entry, exc: Exception, reason: str) -> None:
        """A worker's figures that do not parse (the traceback with the first)."""
        self.warn.error(
            "worker figures unreadable",
            reason=reason,
            worker=slot // 2,
            pid=entry.pid,
            error=f"{type(exc).__name__}: {exc}",
        )


class _TotalsCollector(Collector):
    """The page: the summed families, the workers, and the processes (the main one and
    every worker, with the CPU time of those that exited)."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals

    def collect(self) -> Iterable[Metric]:
        t = self.totals
        yield from metrics.families(t.total)
        yield GaugeMetricFamily("wsechod_workers", "worker processes serving now", t.running)
        yield CounterMetricFamily(
            "wsechod_worker_restarts",
            "worker processes started in the place of one that exited or was recycled",
            value=t.restarts,
        )
        main = metrics.process_figures(t.main_pid)
        if main is None:
            return
        pids = [entry.pid for entry in t.live.values() if entry.pid]
        figures = [f for pid in pids if (f := metrics.process_figures(pid)) is not None]
        yield from metrics.process_families([main, *figures], t.cpu_gone, main.start_time)
