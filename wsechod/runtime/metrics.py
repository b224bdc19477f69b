"""``/metrics``: the daemon's counts in the Prometheus text format.

Nothing is done for metrics per message: the engine keeps plain integers that it needs
anyway (per connection, and the totals of the closed ones), and this collector reads and
sums them when Prometheus scrapes. The registry is the daemon's own, not
prometheus_client's global one, so an embedding program's metrics and ours never mix.
"""

import collections
import dataclasses
import http
import json
import operator
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsechod._version import __version__
from wsechod.engine import Application, Engine, Family, Reply

# The classic text format (what generate_latest writes); every Prometheus reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _sum(a: float, b: float) -> float:
    return a + b


# How workers' gauges add up (Family.merge).
MERGES: dict[str, Callable[[float, float], float]] = {"sum": _sum, "min": min, "max": max}
# A page costs the server about 2 ms, plus 1.5 ms per 1000 open connections (sums over
# them, and the process collector lists the open file descriptors), and anyone who can
# connect can ask for it: it is rendered at most this often, and served as it is meanwhile.
RENDER_INTERVAL = 1.0


def exporter(engine: Engine, app: Application) -> Callable[[], Reply]:
    """The ``/metrics`` page of this engine and application, at most RENDER_INTERVAL old."""
    registry = CollectorRegistry()
    registry.register(WsechodCollector(engine, app))
    if os.access("/proc/stat", os.R_OK):
        ProcessCollector(registry=registry)
    else:  # systemd's ProcSubset=pid hides it, and ProcessCollector then says nothing
        registry.register(SelfProcessCollector())
    rendered_at = -RENDER_INTERVAL
    reply = Reply(http.HTTPStatus.OK, "")

    def page() -> Reply:
        nonlocal rendered_at, reply
        now = time.monotonic()
        if now - rendered_at >= RENDER_INTERVAL:
            body = generate_latest(registry).decode()
            reply = Reply(http.HTTPStatus.OK, body, content_type=CONTENT_TYPE)
            rendered_at = now
        return reply

    return page


def counter(name: str, doc: str, labels: list[str], values: Mapping[Any, int]) -> Metric:
    """A counter family with one sample per key of ``values`` (tuples of label values)."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


@dataclass(slots=True)
class Snapshot:
    """The daemon's figures as plain data: what ``/metrics`` renders, and what each worker
    publishes for the main process to add up (``to_json``). Counters are keyed
    ``family/label/label`` (``closes/client/1000/1000``), gauges by name."""

    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    families: tuple[Family, ...] = ()  # the application's, which its figures are keyed by
    degraded: str | None = None  # what the application reports missing

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Snapshot":
        raw = json.loads(data)
        gauges, counters = raw["gauges"], raw["counters"]
        families = tuple(
            Family(f["name"], f["kind"], f["doc"], tuple(f["labels"]), f["merge"])
            for f in raw["families"]
        )
        return cls(gauges, counters, families, raw["degraded"])


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several processes' snapshots: a stop has begun if any has begun it; an
    application's gauge adds up as its family says (a broker is connected if every
    worker's is)."""
    total = Snapshot()
    gauges, counters = total.gauges, collections.Counter[str]()
    for snap in snapshots:
        total.families = total.families or snap.families
        merging: dict[str, Callable[[float, float], float]] = {"draining": max}
        merging |= {f.name: MERGES[f.merge] for f in snap.families if f.kind == "gauge"}
        for key, value in snap.gauges.items():
            add = merging.get(key, _sum)
            gauges[key] = add(gauges[key], value) if key in gauges else value
        counters.update(snap.counters)
        total.degraded = total.degraded or snap.degraded
    total.counters = dict(counters)
    return total


def snapshot(engine: Engine, app: Application) -> Snapshot:
    """Read the engine's, the relay's and the broker's plain counts now."""
    stats, live = engine.stats, engine.connections

    def count(attribute: str) -> int:
        return sum(map(operator.attrgetter(attribute), live))  # a loop in C

    gauges: dict[str, float] = {
        "draining": int(engine.draining),
        "connections_open": len(live),
        "handshakes_pending": len(engine.handshakes),
    }
    counters = {
        "connections_opened": stats["connections_opened"],
        "handshakes_cut": stats["handshakes_cut"],
        "received/text": stats["text_in"] + count("text_in"),
        "received/binary": stats["messages_in"] - stats["text_in"] + count("binary_in"),
        "sent/text": stats["text_out"] + count("text_out"),
        "sent/binary": stats["messages_out"] - stats["text_out"] + count("binary_out"),
        "bytes_in": stats["bytes_in"] + count("bytes_in"),
        "bytes_out": stats["bytes_out"] + count("bytes_out"),
    }
    for key, value in stats.items():
        if key.startswith(("refused_", "failed_")):
            family, _, label = key.partition("_")
            counters[f"{family}/{label}"] = value
    for labels, value in engine.closes.items():
        counters["closes/" + "/".join(labels)] = value
    figures = app.figures()  # the application's own, named as its families say
    gauges |= figures.gauges
    counters |= figures.counters
    return Snapshot(gauges, counters, app.families(), app.degraded())


def _labelled(counters: Mapping[str, int], family: str) -> dict[tuple[str, ...], int]:
    """The samples of one labelled family: ``family/a/b`` -> ``("a", "b")``."""
    prefix = family + "/"
    return {
        tuple(key[len(prefix) :].split("/")): value
        for key, value in counters.items()
        if key.startswith(prefix)
    }


def families(snap: Snapshot) -> Iterable[Metric]:
    """The wsechod_* families of a snapshot."""
    gauges, counters = snap.gauges, snap.counters
    info = GaugeMetricFamily(
        "wsechod_build_info",
        "versions of wsechod and Python; always 1",
        labels=["version", "python"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    yield info
    yield GaugeMetricFamily(
        "wsechod_draining", "1 once a stop has begun (drain), else 0", value=gauges["draining"]
    )
    yield GaugeMetricFamily(
        "wsechod_connections_open",
        "WebSocket connections open now",
        value=gauges["connections_open"],
    )
    yield GaugeMetricFamily(
        "wsechod_handshakes_pending",
        "TCP connections accepted whose opening handshake is not done yet",
        value=gauges["handshakes_pending"],
    )
    yield CounterMetricFamily(
        "wsechod_connections_opened",
        "WebSocket connections opened (handshake completed)",
        value=counters.get("connections_opened", 0),
    )
    yield CounterMetricFamily(
        "wsechod_handshakes_cut",
        "pending handshakes cut to make room for others when file descriptors ran short",
        value=counters.get("handshakes_cut", 0),
    )
    yield counter(
        "wsechod_handshakes_refused",
        "requests answered with an HTTP error instead of the upgrade, by reason",
        ["reason"],
        _labelled(counters, "refused"),
    )
    doc = "whole WebSocket messages {}, by type (text, binary)"
    yield counter(
        "wsechod_messages_received",
        doc.format("received from clients"),
        ["type"],
        _labelled(counters, "received"),
    )
    yield counter(
        "wsechod_messages_sent",
        doc.format("sent to clients (each relayed copy counts)"),
        ["type"],
        _labelled(counters, "sent"),
    )
    yield CounterMetricFamily(
        "wsechod_received_bytes",
        "payload bytes of the frames received (data and control; compressed size)",
        value=counters.get("bytes_in", 0),
    )
    yield CounterMetricFamily(
        "wsechod_sent_bytes",
        "payload bytes of the data frames sent (compressed size)",
        value=counters.get("bytes_out", 0),
    )
    yield counter(
        "wsechod_closes",
        "closed WebSocket connections: who sent the first close frame (client, server, "
        "none), the codes sent and received (none: no close frame; 3000-4999 by range)",
        ["closed_by", "code_sent", "code_received"],
        _labelled(counters, "closes"),
    )
    yield counter(
        "wsechod_protocol_failures",
        "connections the server failed, by close code: protocol violations (1002), "
        "invalid UTF-8 (1007), too big (1009), keepalive timeouts and errors (1011)",
        ["code"],
        _labelled(counters, "failed"),
    )
    yield from application_families(snap)


def application_families(snap: Snapshot) -> Iterable[Metric]:
    """The application's own families (the relay's and its broker's), as it describes
    them: metrics knows no application. (Labelled families are counters.)"""
    for family in snap.families:
        name, doc = f"wsechod_{family.name}", family.doc
        if family.labels:
            yield counter(name, doc, list(family.labels), _labelled(snap.counters, family.name))
        elif family.kind == "counter":
            yield CounterMetricFamily(name, doc, value=snap.counters.get(family.name, 0))
        else:
            yield GaugeMetricFamily(name, doc, value=snap.gauges.get(family.name, 0))


class WsechodCollector(Collector):
    """Reads the engine's and the application's counters at scrape time."""

    def __init__(self, engine: Engine, app: Application) -> None:
        self.engine = engine
        self.app = app

    def collect(self) -> Iterable[Metric]:
        return families(snapshot(self.engine, self.app))


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    """One process's figures, from /proc/PID alone."""

    cpu_seconds: float
    virtual_bytes: float
    resident_bytes: float
    start_time: float  # seconds since the epoch
    open_fds: int


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = resource.getpagesize()


def open_fds(pid: int | str = "self") -> int:
    """How many descriptors the process has open. Since Linux 6.2 the size of its
    /proc/PID/fd is that count, read in microseconds; listing the directory (the only way
    before) took 90 to 390 ms at 15,000 descriptors, holding the loop for every scrape,
    and the main process twice a second for each worker (its totals)."""
    counted = os.stat(f"/proc/{pid}/fd").st_size
    if counted > 0:
        return counted
    return len(os.listdir(f"/proc/{pid}/fd")) - (pid == "self")  # not the listing's own


def process_figures(pid: int | str = "self") -> ProcessFigures | None:
    """None if the process is gone (or hidden from us)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            parts = f.read().rsplit(b")", 1)[-1].split()
        fds = open_fds(pid)
    except OSError:
        return None
    booted = round(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME))  # /proc/stat's
    return ProcessFigures(
        cpu_seconds=(float(parts[11]) + float(parts[12])) / _TICKS,
        virtual_bytes=float(parts[20]),
        resident_bytes=float(parts[21]) * _PAGE,
        start_time=float(parts[19]) / _TICKS + booted,
        open_fds=fds,
    )


def process_families(
    figures: list[ProcessFigures], extra_cpu: float = 0.0, start_time: float | None = None
) -> Iterable[Metric]:
    """ProcessCollector's families, summed over ``figures`` (memory counts the pages that
    processes share once per process); ``extra_cpu``: that of processes gone."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # per process; all have the same
    if start_time is None:
        start_time = min(f.start_time for f in figures)
    yield GaugeMetricFamily(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        sum(f.virtual_bytes for f in figures),
    )
    yield GaugeMetricFamily(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        sum(f.resident_bytes for f in figures),
    )
    yield GaugeMetricFamily(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        start_time,
    )
    yield CounterMetricFamily(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds.",
        value=sum(f.cpu_seconds for f in figures) + extra_cpu,
    )
    yield GaugeMetricFamily(
        "process_open_fds", "Number of open file descriptors.", sum(f.open_fds for f in figures)
    )
    if limit != resource.RLIM_INFINITY:
        yield GaugeMetricFamily(
            "process_max_fds", "Maximum number of open file descriptors.", float(limit)
        )


class SelfProcessCollector(Collector):
    """ProcessCollector's families from /proc/self alone, for where /proc/stat (the boot
    time, which ProcessCollector needs) is hidden, as under the shipped systemd unit."""

    def collect(self) -> Iterable[Metric]:
        figures = process_figures()
        return [] if figures is None else process_families([figures])
