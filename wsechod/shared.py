"""What the processes of a daemon with several workers share: one block of memory.

The main process maps it (anonymous, shared) before it forks the workers, so each inherits
it. It holds two slots per worker, where the worker publishes its figures (a ``Snapshot``,
the same plain counts ``/metrics`` reads) every PUBLISH_INTERVAL from a timer on its event
loop (successive starts of a worker alternate between its two: one that drains on its own
goes on counting while its replacement serves), and two slots the main process writes
every RENDER_INTERVAL: the ``/metrics`` page of the whole daemon, rendered from the
workers' slots, and the daemon's: its health, whether it stops, and which workers may be
recycled alone (stop accepting and be replaced at once when told to stop). One more holds
the settings a reload read: the main process reads them once and every worker applies
those, so that a file changed meanwhile cannot give workers different ones. Whichever
worker a scrape or a health check lands on serves those, so every answer is the daemon's,
and one process renders: successive pages never go back, whichever worker serves them.
The price is staleness: the page is at most PUBLISH_INTERVAL + RENDER_INTERVAL old.

Each slot is a seqlock (a sequence number, odd while written) with a CRC of its body, so a
reader never takes a half-written slot, and a writer killed mid-write leaves a slot that is
skipped until it is written again. Nothing here waits: a slot that cannot be read now is
taken from the last read, or left out.
"""

import collections
import dataclasses
import http
import json
import mmap
import os
import signal
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsechod import ratelimit
from wsechod.engine import Application, Engine, Reply
from wsechod.log import get_logger
from wsechod.runtime import metrics
from wsechod.runtime.metrics import CONTENT_TYPE, Snapshot
from wsechod.settings import Loaded, Settings

log = get_logger("wsechod")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's publications
RENDER_INTERVAL = 0.5  # seconds between the main process's renders
SLOT_BYTES = 128 * 1024  # a worker's snapshot: a few KiB; each close code pair is a key
PAGE_BYTES = 1024 * 1024  # the rendered page
DAEMON_BYTES = 64 * 1024
SETTINGS_BYTES = 1024 * 1024  # a reload's settings (JSON: about 2 KiB, more with long lists)
READ_ATTEMPTS = 5

# seq (odd while written), gen (which start of the worker), pid, state, length, crc,
# monotonic time of the write
_HEADER = struct.Struct("<QQqIIId")
_SEQ = struct.Struct("<Q")
# The header after its sequence number: written apart, because struct.pack_into zeroes
# what it packs into first, and a sequence number of 0 for a moment is an even one: a
# reader would take the zeroed header for a whole, empty slot.
_FIELDS = struct.Struct("<QqIIId")
HEADER_BYTES = 64

# A worker's state, in its slot: LEAVING and LEFT are a drain of its own (recycled: it
# stopped accepting, another takes its sockets), DRAINING and STOPPED any other.
STARTING, LISTENING, DRAINING, STOPPED, LEAVING, LEFT = range(6)
# From a worker to the main process: look at the board (I listen, or I leave).
DOORBELL = signal.SIGUSR2


@dataclass(frozen=True, slots=True)
class Entry:
    """One slot as last written."""

    seq: int
    gen: int
    pid: int
    state: int
    updated: float  # time.monotonic() of the write (the same clock in every process)
    body: bytes


class Board:
    """The shared block: two slots per worker, then the page, the daemon's, the settings."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.worker_slots = 2 * workers
        self.page_slot, self.daemon_slot = self.worker_slots, self.worker_slots + 1
        self.settings_slot = self.worker_slots + 2
        self._sizes = [SLOT_BYTES] * self.worker_slots + [PAGE_BYTES, DAEMON_BYTES, SETTINGS_BYTES]
        self._offsets = [0]
        for size in self._sizes:
            self._offsets.append(self._offsets[-1] + HEADER_BYTES + size)
        # Anonymous and MAP_SHARED: children forked after this see the same pages. Only
        # the pages written are ever backed by memory.
        self._map = mmap.mmap(-1, self._offsets[-1])

    @staticmethod
    def slot_of(index: int, gen: int) -> int:
        """Where start ``gen`` of worker ``index`` publishes."""
        return 2 * index + gen % 2

    def write(self, slot: int, body: bytes, *, gen: int = 0, pid: int = 0, state: int = 0) -> bool:
        """Replace a slot; False (nothing written) if ``body`` does not fit."""
        if len(body) > self._sizes[slot]:
            return False
        at, m = self._offsets[slot], self._map
        seq = _SEQ.unpack_from(m, at)[0]
        begin = seq + 1 if seq % 2 == 0 else seq + 2  # odd: a writer died mid-write before
        _SEQ.pack_into(m, at, begin)
        start = at + HEADER_BYTES
        m[start : start + len(body)] = body
        _FIELDS.pack_into(
            m, at + _SEQ.size, gen, pid, state, len(body), zlib.crc32(body), time.monotonic()
        )
        _SEQ.pack_into(m, at, begin + 1)
        return True

    def hand_down(self, loaded: Loaded | None) -> bool:
        """The settings a reload read, for the workers (None: none to apply, the main
        process said why); False if they do not fit. As data (JSON), never code: every
        worker maps this block writable, and one must not be able to run code in the
        others through it."""
        if loaded is None:
            return self.write(self.settings_slot, b"null")
        body = {
            "settings": dataclasses.asdict(loaded.settings),
            "sources": dict(loaded.sources),
            "config_path": None if loaded.config_path is None else str(loaded.config_path),
        }
        return self.write(self.settings_slot, json.dumps(body).encode())

    def handed_down(self) -> Loaded | None:
        """What a worker applies on a reload: the settings the main process read last, or
        None (none read, none could be, or the slot cannot be read: said in the log)."""
        entry = self.read(self.settings_slot)
        if entry is None:
            log.error("settings handed down unreadable: the old ones stay")
            return None
        raw = json.loads(entry.body) if entry.body else None
        if raw is None:
            return None
        values: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in raw["settings"].items()
        }
        path = raw["config_path"]
        return Loaded(Settings(**values), raw["sources"], None if path is None else Path(path))

    def seq(self, slot: int) -> int:
        """Changes whenever the slot is written: what a reader compares with its copy."""
        return int(_SEQ.unpack_from(self._map, self._offsets[slot])[0])

    def read(self, slot: int) -> Entry | None:
        """The slot, whole and consistent; None if it is being written (or was left half
        written by a writer that died)."""
        at, m = self._offsets[slot], self._map
        for _ in range(READ_ATTEMPTS):
            seq, gen, pid, state, length, crc, updated = _HEADER.unpack_from(m, at)
            if seq % 2 or length > self._sizes[slot]:
                time.sleep(0)  # let the writer finish
                continue
            start = at + HEADER_BYTES
            body = m[start : start + length]
            if _SEQ.unpack_from(m, at)[0] == seq and zlib.crc32(body) == crc:
                return Entry(seq, gen, pid, state, updated, body)
        return None


class Worker:
    """This process as worker ``index`` of a daemon: publishes its figures, serves the
    daemon's ``/metrics`` page and health."""

    def __init__(
        self, board: Board, index: int, gen: int, main_pid: int, tick: Callable[["Worker"], None]
    ) -> None:
        self.board, self.index, self.gen, self.main_pid = board, index, gen, main_pid
        self.pid = os.getpid()
        self.slot = board.slot_of(index, gen)
        self.state = STARTING
        self._tick_hook = tick  # called after each publication (the parent check)
        self._engine: Engine | None = None
        self._app: Application | None = None
        self._page: tuple[int, Reply] = (-1, Reply(http.HTTPStatus.OK, ""))
        self._daemon: tuple[int, Daemon] = (-1, Daemon())  # the daemon slot, as last read
        self._too_big = False

    def attach(self, engine: Engine, app: Application) -> None:
        """The engine listens: publish its figures from now on."""
        self._engine, self._app = engine, app
        self.publish()
        self._schedule()

    def listening(self) -> None:
        self.state = LISTENING
        self.publish()
        self._ring()

    def recycling(self) -> bool:
        """This worker starts its drain. True if it leaves alone: the main process says
        (now, in the daemon's slot) that it does not stop and would start another in this
        one's place at once; then this one must stop accepting, so that newcomers wait in
        the backlog for the other rather than get 503 from this one. Otherwise (the daemon
        stops, the main process is gone or cannot be read, the one this worker replaced
        still drains, the daemon is still starting) it drains as any process does."""
        if self._engine is None or self.state != LISTENING:
            return False
        self.publish()  # DRAINING, now: the main process must not stop it a second time
        if not self._parent_alive():
            return False
        daemon = self.board.read(self.board.daemon_slot)
        if daemon is None or daemon.state == DRAINING:
            return False
        if self.pid not in Daemon.from_json(daemon.body).alone:
            return False
        self.state = LEAVING
        self.publish()
        self._ring()
        return True

    def daemon_draining(self) -> bool:
        """The daemon stops (not this worker alone), or its main process is gone: what
        ``/healthz`` answers."""
        return not self._parent_alive() or self._read_daemon().draining

    def stopped(self) -> None:
        """The last publication, after the drain: nothing counted is lost."""
        self.state = LEFT if self.state == LEAVING else STOPPED
        self.publish()

    def _parent_alive(self) -> bool:
        return os.getppid() == self.main_pid

    def _ring(self) -> None:
        if self._parent_alive():
            os.kill(self.main_pid, DOORBELL)

    @property
    def draining(self) -> bool:
        return self._engine is not None and self._engine.draining

    def publish(self) -> None:
        if self._engine is None or self._app is None:
            return
        snap = metrics.snapshot(self._engine, self._app)
        state = DRAINING if self._engine.draining and self.state == LISTENING else self.state
        written = self.board.write(
            self.slot, snap.to_json(), gen=self.gen, pid=self.pid, state=state
        )
        if not written and not self._too_big:
            self._too_big = True  # cannot happen with the families there are; say it once
            log.error("figures too big to share between workers", limit=SLOT_BYTES)

    def _schedule(self) -> None:
        assert self._engine is not None
        self._engine.loop.call_later(PUBLISH_INTERVAL, self._tick)

    def _tick(self) -> None:
        try:
            self.publish()
            self._tick_hook(self)
        finally:  # whatever happens, keep publishing: a silent worker looks wedged
            self._schedule()

    def page(self) -> Reply:
        """The daemon's ``/metrics`` page, as the main process last rendered it."""
        seq = self.board.seq(self.board.page_slot)
        if seq != self._page[0]:
            entry = self.board.read(self.board.page_slot)
            if entry is not None:
                body = entry.body.decode()
                self._page = (entry.seq, Reply(http.HTTPStatus.OK, body, content_type=CONTENT_TYPE))
        return self._page[1]

    def degraded(self, app: Application) -> str | None:
        """This worker's own trouble first (fresh; not while it drains: its broker closing
        is not the daemon's trouble), else the daemon's (any worker's broker, a worker not
        running), as the main process last saw it."""
        mine = None if self.draining else app.degraded()
        if mine is not None:
            return mine
        return self._read_daemon().degraded

    def _read_daemon(self) -> "Daemon":
        """The daemon's slot as the main process last wrote it, read again only when it
        has changed (while it is being written: as read before)."""
        seq = self.board.seq(self.board.daemon_slot)
        if seq != self._daemon[0]:
            entry = self.board.read(self.board.daemon_slot)
            if entry is not None:
                self._daemon = (entry.seq, Daemon.from_json(entry.body, entry.state))
        return self._daemon[1]


@dataclass(frozen=True, slots=True)
class Daemon:
    """What the main process says of the whole daemon, in its slot."""

    degraded: str | None = None  # what /healthz reports missing
    alone: frozenset[int] = frozenset()  # pids of the workers that may be recycled alone
    draining: bool = False  # the slot's state: DRAINING

    def to_json(self) -> bytes:
        return json.dumps({"degraded": self.degraded, "alone": sorted(self.alone)}).encode()

    @classmethod
    def from_json(cls, body: bytes, state: int = LISTENING) -> "Daemon":
        raw = json.loads(body) if body else {}
        return cls(raw.get("degraded"), frozenset(raw.get("alone", ())), state == DRAINING)


class Totals:
    """The main process's side: adds up the workers' slots, keeps what exited workers had
    counted (so that counters never go back when a worker is replaced), and renders the
    page and the health for the workers to serve."""

    def __init__(
        self, board: Board, main_pid: int, warn: ratelimit.RateLimitedLog | None = None
    ) -> None:
        self.board = board
        self.main_pid = main_pid
        # Figures a worker wrote that cannot be parsed (which only a bug of ours can do):
        # an error, rate-limited (the supervisor's, polled by its loop).
        self.warn = warn or ratelimit.RateLimitedLog(log, polled=True)
        self.retired: collections.Counter[str] = collections.Counter()
        self.folded = [0] * board.worker_slots  # per slot: the last start (gen) added up
        self.cpu_gone = 0.0  # CPU seconds of the workers that exited (from wait4)
        self.restarts = 0
        self.running = 0  # workers listening now (the supervisor keeps it)
        self.stopping = False
        self.alone: Callable[[], Iterable[int]] = tuple  # pids that may leave alone now
        self.live: dict[int, Entry] = {}
        # Per slot, the last entry that could be read: a slot caught mid-write (its
        # worker preempted while publishing) stands for itself with it, so that no total
        # goes back for a moment (Prometheus would take that for a reset).
        self.last: dict[int, Entry] = {}
        self.total = Snapshot()
        self._registry = CollectorRegistry()
        self._registry.register(_TotalsCollector(self))

    def fold(self, index: int, gen: int, cpu: float) -> None:
        """Worker ``index`` (its start ``gen``) exited: what it counted becomes retired,
        from its last publication; its gauges go with it."""
        slot = self.board.slot_of(index, gen)
        entry = self.board.read(slot) or self.last.get(slot)
        if entry is not None and entry.gen == gen and entry.body:
            try:
                self.retired.update(Snapshot.from_json(entry.body).counters)
            except (ValueError, KeyError, TypeError) as exc:
                self._unreadable(slot, entry, exc, "its counts are lost")
        self.last.pop(slot, None)
        self.folded[slot] = max(self.folded[slot], gen)
        self.cpu_gone += cpu

    def render(self) -> Snapshot:
        """Add up, write the page and the health; returns the total (for systemd)."""
        self.live = {}
        snaps = [Snapshot(counters=dict(self.retired))]
        for slot in range(self.board.worker_slots):
            entry = self.board.read(slot)
            if entry is None:
                entry = self.last.get(slot)
            else:
                self.last[slot] = entry
            if entry is None or entry.gen <= self.folded[slot]:
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
        self.board.write(self.board.page_slot, generate_latest(self._registry))
        problems = [self.total.degraded] if self.total.degraded else []
        missing = self.board.workers - self.running
        if missing and not self.stopping:
            problems.append(f"{missing} of {self.board.workers} workers not running")
        daemon = Daemon("; ".join(problems) or None, frozenset(self.alone()))
        state = DRAINING if self.stopping else LISTENING
        self.board.write(self.board.daemon_slot, daemon.to_json(), state=state)
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
