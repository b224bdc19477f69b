"""``/metrics``: the daemon's counts in the Prometheus text format.

Nothing is done for metrics per message: the engine keeps plain integers that it needs
anyway (per connection, and the totals of the closed ones), and this collector reads and
sums them when Prometheus scrapes. The registry is the daemon's own, not
prometheus_client's global one, so an embedding program's metrics and ours never mix.
"""

import http
import operator
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsechod import __version__
from wsechod.apps.relay import Relay
from wsechod.engine import Application, Engine, Reply

# The classic text format (what generate_latest writes); every Prometheus reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BROKER_OUTCOMES = ("published", "delivered", "lost", "unconfirmed", "failed", "malformed")
SLOW_ACTIONS = {"drop": "slow_dropping", "close": "slow_closed"}
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


class WsechodCollector(Collector):
    """Reads the engine's, the relay's and the broker's counters at scrape time."""

    def __init__(self, engine: Engine, app: Application) -> None:
        self.engine = engine
        self.app = app

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        stats = engine.stats
        info = GaugeMetricFamily(
            "wsechod_build_info",
            "versions of wsechod and Python; always 1",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield GaugeMetricFamily(
            "wsechod_draining", "1 once a stop has begun (drain), else 0", value=engine.draining
        )
        yield GaugeMetricFamily(
            "wsechod_connections_open",
            "WebSocket connections open now",
            value=len(engine.connections),
        )
        yield GaugeMetricFamily(
            "wsechod_handshakes_pending",
            "TCP connections accepted whose opening handshake is not done yet",
            value=len(engine.handshakes),
        )
        yield CounterMetricFamily(
            "wsechod_connections_opened",
            "WebSocket connections opened (handshake completed)",
            value=stats["connections_opened"],
        )
        yield counter(
            "wsechod_handshakes_refused",
            "requests answered with an HTTP error instead of the upgrade, by reason",
            ["reason"],
            {
                (k.removeprefix("refused_"),): v
                for k, v in stats.items()
                if k.startswith("refused_")
            },
        )
        yield from self._traffic()
        yield counter(
            "wsechod_closes",
            "closed WebSocket connections: who sent the first close frame (client, server, "
            "none), the codes sent and received (none: no close frame; 3000-4999 by range)",
            ["closed_by", "code_sent", "code_received"],
            engine.closes,
        )
        yield counter(
            "wsechod_protocol_failures",
            "connections the server failed, by close code: protocol violations (1002), "
            "invalid UTF-8 (1007), too big (1009), keepalive timeouts and errors (1011)",
            ["code"],
            {(k.removeprefix("failed_"),): v for k, v in stats.items() if k.startswith("failed_")},
        )
        if isinstance(self.app, Relay):
            yield from self._relay(self.app)

    def _traffic(self) -> Iterable[Metric]:
        """Messages and bytes: the totals of closed connections plus those still open."""
        stats, live = self.engine.stats, self.engine.connections

        def count(attribute: str) -> int:
            return sum(map(operator.attrgetter(attribute), live))  # a loop in C

        text_in = stats["text_in"] + count("text_in")
        binary_in = stats["messages_in"] - stats["text_in"] + count("binary_in")
        text_out = stats["text_out"] + count("text_out")
        binary_out = stats["messages_out"] - stats["text_out"] + count("binary_out")
        doc = "whole WebSocket messages {}, by type (text, binary)"
        yield counter(
            "wsechod_messages_received",
            doc.format("received from clients"),
            ["type"],
            {("text",): text_in, ("binary",): binary_in},
        )
        yield counter(
            "wsechod_messages_sent",
            doc.format("sent to clients (each relayed copy counts)"),
            ["type"],
            {("text",): text_out, ("binary",): binary_out},
        )
        yield CounterMetricFamily(
            "wsechod_received_bytes",
            "payload bytes of the frames received (data and control; compressed size)",
            value=stats["bytes_in"] + count("bytes_in"),
        )
        yield CounterMetricFamily(
            "wsechod_sent_bytes",
            "payload bytes of the data frames sent (compressed size)",
            value=stats["bytes_out"] + count("bytes_out"),
        )

    def _relay(self, relay: Relay) -> Iterable[Metric]:
        yield GaugeMetricFamily("wsechod_relay_channels", "relay channels now", len(relay.channels))
        yield GaugeMetricFamily(
            "wsechod_relay_members",
            "clients on relay channels now",
            sum(len(c.members) for c in relay.channels.values()),
        )
        yield CounterMetricFamily(
            "wsechod_relay_dropped_messages",
            "messages not sent to slow consumers (slow_consumer = drop)",
            value=relay.stats["dropped"],
        )
        yield counter(
            "wsechod_relay_slow_consumers",
            "receivers found slow, by what was done: drop (their messages) or close (1008)",
            ["action"],
            {(action,): relay.stats[key] for action, key in SLOW_ACTIONS.items()},
        )
        yield CounterMetricFamily(
            "wsechod_relay_remote_messages",
            "messages from other instances (the broker) relayed to local members",
            value=relay.stats["remote"],
        )
        broker = relay.broker
        counts = broker.stats()
        yield GaugeMetricFamily(
            "wsechod_broker_connected",
            "1 while the broker relays between instances, 0 while degraded (see /healthz)",
            value=broker.degraded() is None,
        )
        yield counter(
            "wsechod_broker_messages",
            "messages between instances by outcome: published (answered by Redis), delivered "
            "(from other instances), lost (never sent), unconfirmed (sent, not answered), "
            "failed (refused by Redis), malformed (not wsechod's)",
            ["outcome"],
            {(outcome,): counts.get(outcome, 0) for outcome in BROKER_OUTCOMES},
        )
        yield CounterMetricFamily(
            "wsechod_broker_reconnects",
            "sessions with the broker after the first",
            value=counts.get("reconnects", 0),
        )


class SelfProcessCollector(Collector):
    """ProcessCollector's families from /proc/self alone, for where /proc/stat (the boot
    time, which ProcessCollector needs) is hidden, as under the shipped systemd unit."""

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = resource.getpagesize()

    def collect(self) -> Iterable[Metric]:
        try:
            with open("/proc/self/stat", "rb") as f:
                parts = f.read().rsplit(b")", 1)[-1].split()
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            return
        booted = round(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME))  # /proc/stat's
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            float(parts[21]) * self._page,
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            float(parts[19]) / self._ticks + booted,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=(float(parts[11]) + float(parts[12])) / self._ticks,
        )
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", fds)
        if limit != resource.RLIM_INFINITY:
            yield GaugeMetricFamily(
                "process_max_fds", "Maximum number of open file descriptors.", float(limit)
            )
