"""``make bench``: wsechod against the websockets example, Node's ws and others, in one run.

Every server runs pinned to core 0, the load client (this process, picows on uvloop) on core
1. For each repeat each server is measured in turn, so that drift on a shared machine
touches them all alike; the table gives the median of the repeats and its ratio to the
baseline (the websockets example with the legacy API; for fan-out, a relay written with
websockets' ``broadcast()``) and to Node's ws.
"""

import argparse
import asyncio
import atexit
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import uvloop

from bench import client, deflate, storm, tls, tokens
from bench.peers import (
    ECHO_PEERS,
    HANDSHAKE_PEERS,
    NODE_DIR,
    REDIS_PEERS,
    RELAY_PEERS,
    RESUME_PEERS,
    ROOT,
    SCRAPED_PEERS,
    WORKERS,
    Peer,
    PeerError,
    Server,
    deflate_peer,
    kill_all,
    start_redis,
    workers_peer,
)

SATURATED = 0.90  # client CPU / wall time from which the client is the bottleneck
# The deflate cases' messages, made once for every server and repeat.
DEFLATE_MESSAGES: dict[deflate.Case, list[bytes]] = {}
SCRAPE_INTERVAL = 1.0  # seconds between GET /metrics with --scrape, as a busy Prometheus
PIPELINE_CONNECTIONS = 50  # the pipelined echo case's
SCENARIOS = ("echo", "idle", "fanout", "deflate", "handshake", "resume", "redis")
# Each kind's columns are compared with this peer's (and with Node's ws, where it runs).
BASES = {
    "echo": ("example", "example"),
    "relay": ("broadcast", "broadcast()"),
    "handshake": ("wsechod", "no token"),
    "resume": ("wsechod-history", "wsechod"),
    "redis": ("wsechod-redis", "pub/sub"),
}


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    section: str
    ratios: bool = True  # print "x example" / "x ws" rows
    floor: bool = False  # a throughput: only a floor when the client was saturated
    digits: int | None = None
    worst: bool = False  # show the smallest value of the repeats instead of the median
    kind: str = "echo"  # whose columns: "echo", "relay" or "handshake" peers


@dataclass
class Results:
    """Per (kind, peer, figure key): one value per repeat, and whether the client saturated."""

    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    saturated: dict[tuple[str, str, str], list[bool]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, peer: Peer, key: str, value: float, saturated: bool = False) -> None:
        self.values.setdefault((peer.kind, peer.name, key), []).append(value)
        self.saturated.setdefault((peer.kind, peer.name, key), []).append(saturated)

    def median(
        self, kind: str, name: str, key: str, worst: bool = False
    ) -> tuple[float, bool] | None:
        """The median (or smallest) value, and whether most runs saturated the client."""
        values = self.values.get((kind, name, key))
        if not values:
            return None
        flags = self.saturated[(kind, name, key)]
        return min(values) if worst else statistics.median(values), 2 * sum(flags) > len(flags)


def echo_cases(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(key, connections, size, messages in flight per connection)."""
    cases = [(f"echo {n}x{args.size}", n, args.size, 1) for n in args.connections]
    if args.big_size:
        cases.append((f"echo {args.big_connections}x{args.big_size}", *args.big_case, 1))
    if args.pipeline > 1:
        n, depth = PIPELINE_CONNECTIONS, args.pipeline
        cases.append((f"echo {n}x{args.size} d{depth}", n, args.size, depth))
    return cases


def fan_cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(key, publishers)."""
    return [("fan", 1)] + ([(f"fan{args.publishers}", args.publishers)] * (args.publishers > 1))


def deflate_cases(args: argparse.Namespace) -> list[deflate.Case]:
    return [
        deflate.Case(args.deflate_messages, fragment=int(fragment), payload=payload)
        for payload, _, fragment in (c.partition("/") for c in args.deflate_cases)
    ]


def describe_size(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def figures(args: argparse.Namespace) -> list[Figure]:
    out: list[Figure] = []
    if "echo" in args.scenarios:
        for key, n, size, depth in echo_cases(args):
            way = "ping-pong" if depth == 1 else f"{depth} in flight per connection"
            section = f"echo, {n} connection{'s' * (n > 1)}, {describe_size(size)} messages, {way}"
            out += [
                Figure(f"{key} rt/s", "round trips/s", section, floor=True),
                Figure(f"{key} p50", "p50 latency µs", section),
                Figure(f"{key} p99", "p99 latency µs", section),
                Figure(f"{key} cpu", "server CPU µs/msg", section, digits=1),
                Figure(f"{key} server%", "server core busy %", section, ratios=False),
                Figure(f"{key} client%", "client core busy %", section, ratios=False),
            ]
    if "deflate" in args.scenarios:
        for case in deflate_cases(args):
            section = (
                f"permessage-deflate echo, 1 connection, {case.messages} {case.payload} messages "
                f"of {describe_size(case.smallest)}-{describe_size(case.largest)} in "
                f"{describe_size(case.fragment)} fragments, one at a time"
            )
            out += [
                Figure(f"{case.key} cpu", "server CPU ms/msg", section, digits=2),
                Figure(f"{case.key} ms", "ms per message", section, digits=2),
                Figure(f"{case.key} server%", "server core busy %", section, ratios=False),
                Figure(f"{case.key} client%", "client core busy %", section, ratios=False),
            ]
    if "idle" in args.scenarios:
        section = f"{args.idle} idle connections, then SIGTERM"
        out += [
            Figure("idle kib", "KiB per idle connection", section, digits=1),
            Figure("drain s", "drain: SIGTERM to exit, s", section, digits=2),
            Figure(
                "closed 1001", f"closed 1001 (of {args.idle}), worst", section, False, worst=True
            ),
        ]
    for key, publishers in fan_cases(args) if "fanout" in args.scenarios else ():
        section = (
            f"fan-out, {publishers} publisher{'s' * (publishers > 1)} to {args.subscribers} "
            f"subscribers on one channel, {describe_size(args.size)} messages"
        )
        out += [
            Figure(f"{key} rate", "deliveries/s", section, floor=True, kind="relay"),
            Figure(f"{key} p99", "p99 batch latency µs", section, kind="relay"),
            Figure(f"{key} cpu", "server CPU µs/delivery", section, digits=2, kind="relay"),
            Figure(f"{key} server%", "server core busy %", section, ratios=False, kind="relay"),
            Figure(f"{key} client%", "client core busy %", section, ratios=False, kind="relay"),
        ]
    if "handshake" in args.scenarios:
        section = (
            f"opening handshakes, {args.handshakes} connections, "
            f"{client.HANDSHAKES_IN_FLIGHT} at a time, a different token each"
        )
        out += [
            Figure("hs rate", "handshakes/s", section, floor=True, kind="handshake"),
            Figure("hs cpu", "server CPU µs/handshake", section, digits=1, kind="handshake"),
            Figure("hs server%", "server core busy %", section, ratios=False, kind="handshake"),
            Figure("hs client%", "client core busy %", section, ratios=False, kind="handshake"),
        ]
        for key, offer in (("storm", ""), ("storm deflate", ", permessage-deflate offered")):
            section = (
                f"connections opened and closed (TCP, TLS where served, upgrade{offer}, close "
                f"handshake), {storm.IN_FLIGHT} at a time, {args.handshakes} a run"
            )
            out += [
                Figure(f"{key} rate", "connections/s", section, floor=True, kind="handshake"),
                Figure(
                    f"{key} cpu", "server CPU µs/connection", section, digits=1, kind="handshake"
                ),
            ]
    if "redis" in args.scenarios:
        section = (
            f"fan-out through Redis: 1 publisher on one instance, {args.subscribers} "
            f"subscribers on another, {describe_size(args.size)} messages"
        )
        out += [
            Figure("redis rate", "deliveries/s", section, floor=True, kind="redis"),
            Figure("redis p99", "p99 batch latency µs", section, kind="redis"),
            Figure("redis cpu", "both servers' CPU µs/delivery", section, digits=2, kind="redis"),
            Figure("redis client%", "client core busy %", section, ratios=False, kind="redis"),
        ]
    if "resume" in args.scenarios:
        section = (
            f"resume: a wsechod.v1 client catching up with {args.resume} messages of "
            f"{describe_size(args.size)} from history (memory broker)"
        )
        out += [
            Figure("resume s", "seconds to the junction", section, False, digits=3, kind="resume"),
            Figure("resume cpu", "server CPU ms", section, ratios=False, kind="resume"),
            Figure("resume kib", "server RSS growth, KiB", section, ratios=False, kind="resume"),
        ]
    return out


# Measuring ---------------------------------------------------------------------------------


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def guarded(results: Results, what: str, step: Callable[[], Awaitable[None]]) -> bool:
    try:
        gc.collect()
        gc.disable()
        await step()
        return True
    except (PeerError, OSError, TimeoutError, ConnectionError, AssertionError) as exc:
        results.errors.append(f"{what}: {exc}")
        note(f"  FAILED {what}: {exc}")
        return False
    finally:
        gc.enable()


async def measure_echo(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    for key, n, size, depth in echo_cases(args):
        what = f"{peer.label} {key} (repeat {repeat})"
        step = functools.partial(
            echo_case, args, results, peer, repeat, server, key, n, size, depth
        )
        if not await guarded(results, what, step) and server.proc.poll() is not None:
            raise PeerError(f"{peer.label} exited with status {server.proc.returncode}")


async def echo_case(  # noqa: PLR0917
    args: argparse.Namespace,
    results: Results,
    peer: Peer,
    repeat: int,
    server: Server,
    key: str,
    n: int,
    size: int,
    depth: int,
) -> None:
    r = await client.echo(
        server.port,
        connections=n,
        size=size,
        depth=depth,
        warmup=args.warmup,
        seconds=args.seconds,
        server_cpu=server.cpu_seconds,
        tokens=made_tokens(peer, n),
        tls=tls.client_context() if peer.tls else None,
    )
    w = r.window
    sat = w.client_cpu / w.seconds >= SATURATED
    results.add(peer, f"{key} rt/s", w.events / w.seconds, sat)
    results.add(peer, f"{key} p50", r.p50 * 1e6, sat)
    results.add(peer, f"{key} p99", r.p99 * 1e6, sat)
    results.add(peer, f"{key} cpu", w.server_cpu / w.events * 1e6)
    results.add(peer, f"{key} server%", 100 * w.server_cpu / w.seconds)
    results.add(peer, f"{key} client%", 100 * w.client_cpu / w.seconds, sat)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": key}
        | {"connections": n, "size": size, "in_flight": depth}
        | {"seconds": w.seconds, "round_trips": w.events}
        | {"server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
        | {"p50_us": r.p50 * 1e6, "p99_us": r.p99 * 1e6}
    )
    note(
        f"  {peer.label:<12} {key:<14} {w.events / w.seconds:>9.0f} rt/s  "
        f"p50 {r.p50 * 1e6:>7.0f} µs  p99 {r.p99 * 1e6:>7.0f} µs  "
        f"server {w.server_cpu / w.events * 1e6:>6.1f} µs/msg  "
        f"client {100 * w.client_cpu / w.seconds:>3.0f}%"
    )


async def measure_idle(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    r = await client.idle_and_drain(
        server.port, proc=server.proc, connections=args.idle, rss=server.rss_bytes
    )
    status = server.stop()
    results.add(peer, "idle kib", r.kib_per_connection)
    results.add(peer, "drain s", r.drain_seconds)
    results.add(peer, "closed 1001", r.closed_1001)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": "idle"}
        | {"connections": r.connections, "kib_per_connection": r.kib_per_connection}
        | {"drain_s": r.drain_seconds, "closed_1001": r.closed_1001}
        | {"closed_other": r.closed_other, "no_close_frame": r.cut, "exit_status": status}
    )
    note(
        f"  {peer.label:<12} {'idle':<14} {r.kib_per_connection:>6.1f} KiB/conn  drain "
        f"{r.drain_seconds:.2f} s  1001: {r.closed_1001}/{r.connections}  other codes: "
        f"{r.closed_other}  no close frame: {r.cut}  exit status {status}"
    )
    if status != 0:
        results.errors.append(f"{peer.label} exited with status {status} after SIGTERM")


async def measure_deflate(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    for case in deflate_cases(args):
        what = f"{peer.label} {case.key} (repeat {repeat})"
        step = functools.partial(deflate_case, args, results, peer, repeat, server, case)
        if not await guarded(results, what, step) and server.proc.poll() is not None:
            raise PeerError(f"{peer.label} exited with status {server.proc.returncode}")


async def deflate_case(  # noqa: PLR0917
    args: argparse.Namespace,
    results: Results,
    peer: Peer,
    repeat: int,
    server: Server,
    case: deflate.Case,
) -> None:
    messages = DEFLATE_MESSAGES.get(case)
    if messages is None:
        messages = DEFLATE_MESSAGES[case] = deflate.make_messages(case)
    r = await deflate.deflate_echo(server.port, case, messages, server.cpu_seconds)
    w = r.window
    key = case.key
    results.add(peer, f"{key} cpu", w.server_cpu / w.events * 1e3)
    results.add(peer, f"{key} ms", w.seconds / w.events * 1e3)
    results.add(peer, f"{key} server%", 100 * w.server_cpu / w.seconds)
    results.add(peer, f"{key} client%", 100 * w.client_cpu / w.seconds)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": key}
        | {"messages": w.events, "seconds": w.seconds, "fragment": case.fragment}
        | {"server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
        | {"echo_frames": r.server_frames, "echo_bytes": r.server_bytes}
        | {"sent_bytes": r.client_bytes}
    )
    note(
        f"  {peer.label:<12} {key:<26} {w.seconds / w.events * 1e3:>6.2f} ms/msg  "
        f"server {w.server_cpu / w.events * 1e3:>6.2f} ms/msg  "
        f"client {100 * w.client_cpu / w.seconds:>3.0f}%  echo in {r.server_frames} frames"
    )


async def measure_fanout(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    for key, publishers in fan_cases(args):
        step = functools.partial(fanout_case, args, results, peer, repeat, server, key, publishers)
        await guarded(results, f"{peer.label} {key} (repeat {repeat})", step)


async def fanout_case(  # noqa: PLR0917
    args: argparse.Namespace,
    results: Results,
    peer: Peer,
    repeat: int,
    server: Server,
    key: str,
    publishers: int,
) -> None:
    w, p99 = await client.fan_out(
        server.port,
        subscribers=args.subscribers,
        size=args.size,
        warmup=args.warmup,
        seconds=args.seconds,
        server_cpu=server.cpu_seconds,
        tokens=made_tokens(peer, args.subscribers + publishers),
        tls=tls.client_context() if peer.tls else None,
        deflate=peer.deflate,
        publishers=publishers,
    )
    sat = w.client_cpu / w.seconds >= SATURATED
    results.add(peer, f"{key} p99", p99 * 1e6, sat)
    results.add(peer, f"{key} rate", w.events / w.seconds, sat)
    results.add(peer, f"{key} cpu", w.server_cpu / w.events * 1e6)
    results.add(peer, f"{key} server%", 100 * w.server_cpu / w.seconds)
    results.add(peer, f"{key} client%", 100 * w.client_cpu / w.seconds, sat)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": key}
        | {"subscribers": args.subscribers, "publishers": publishers, "size": args.size}
        | {"seconds": w.seconds, "deliveries": w.events}
        | {"server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
    )
    note(
        f"  {peer.label:<12} {key:<14} {w.events / w.seconds:>9.0f} deliveries/s  "
        f"server {w.server_cpu / w.events * 1e6:>6.2f} µs/delivery  "
        f"client {100 * w.client_cpu / w.seconds:>3.0f}%"
    )


def made_tokens(peer: Peer, count: int) -> Iterator[str] | None:
    """For a peer that checks tokens, ``count`` of them, made before they are measured."""
    return None if peer.auth is None else iter(list(tokens.tokens(peer.auth, count)))


async def measure_handshake(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    await client.handshakes(server.port, connections=50, server_cpu=server.cpu_seconds,
                            tokens=made_tokens(peer, 50),
                            tls=tls.client_context() if peer.tls else None)  # fmt: skip
    w = await client.handshakes(
        server.port,
        connections=args.handshakes,
        server_cpu=server.cpu_seconds,
        tokens=made_tokens(peer, args.handshakes),
        tls=tls.client_context() if peer.tls else None,
    )
    sat = w.client_cpu / w.seconds >= SATURATED
    results.add(peer, "hs rate", w.events / w.seconds, sat)
    results.add(peer, "hs cpu", w.server_cpu / w.events * 1e6)
    results.add(peer, "hs server%", 100 * w.server_cpu / w.seconds)
    results.add(peer, "hs client%", 100 * w.client_cpu / w.seconds, sat)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": "handshake"}
        | {"handshakes": w.events, "seconds": w.seconds}
        | {"server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
    )
    note(
        f"  {peer.label:<12} {'handshakes':<14} {w.events / w.seconds:>9.0f} /s  "
        f"server {w.server_cpu / w.events * 1e6:>6.1f} µs/handshake  "
        f"client {100 * w.client_cpu / w.seconds:>3.0f}%"
    )
    if peer.auth is None:
        for key, offer in (("storm", False), ("storm deflate", True)):
            await measure_storm(args, results, peer, repeat, server, key=key, deflate=offer)


async def measure_storm(
    args: argparse.Namespace,
    results: Results,
    peer: Peer,
    repeat: int,
    server: Server,
    *,
    key: str,
    deflate: bool,
) -> None:
    """Connections opened and closed as fast as the client can (``bench.storm``)."""
    context = tls.client_context() if peer.tls else None
    run = functools.partial(
        storm.storm, server.port, server_cpu=server.cpu_seconds, tls=context, deflate=deflate
    )
    await run(cycles=max(args.handshakes // 10, storm.IN_FLIGHT))  # warm-up (Node's JIT)
    w = await run(cycles=args.handshakes)
    sat = w.client_cpu / w.seconds >= SATURATED
    results.add(peer, f"{key} rate", w.events / w.seconds, sat)
    results.add(peer, f"{key} cpu", w.server_cpu / w.events * 1e6)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": key}
        | {"connections": w.events, "seconds": w.seconds}
        | {"server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
    )
    note(
        f"  {peer.label:<12} {key:<14} {w.events / w.seconds:>9.0f} /s  "
        f"server {w.server_cpu / w.events * 1e6:>6.1f} µs/connection  "
        f"client {100 * w.client_cpu / w.seconds:>3.0f}%"
    )


async def measure_redis(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    """Subscribers on ``server``, the publisher on a second instance of the same peer."""
    publisher = Server(peer, args.server_core, args.subscribers + 1)
    try:
        w, p99 = await client.fan_out(
            server.port,
            subscribers=args.subscribers,
            size=args.size,
            warmup=args.warmup,
            seconds=args.seconds,
            server_cpu=lambda: server.cpu_seconds() + publisher.cpu_seconds(),
            publisher_port=publisher.port,
        )
    finally:
        publisher.stop()
    sat = w.client_cpu / w.seconds >= SATURATED
    results.add(peer, "redis rate", w.events / w.seconds, sat)
    results.add(peer, "redis p99", p99 * 1e6, sat)
    results.add(peer, "redis cpu", w.server_cpu / w.events * 1e6)
    results.add(peer, "redis client%", 100 * w.client_cpu / w.seconds, sat)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": "redis"}
        | {"subscribers": args.subscribers, "seconds": w.seconds, "deliveries": w.events}
        | {"p99_us": p99 * 1e6, "server_cpu_s": w.server_cpu, "client_cpu_s": w.client_cpu}
    )
    note(
        f"  {peer.label:<12} {'redis':<14} {w.events / w.seconds:>9.0f} deliveries/s  "
        f"p99 {p99 * 1e6:>7.0f} µs  servers {w.server_cpu / w.events * 1e6:>6.2f} µs/delivery"
    )


async def measure_resume(
    args: argparse.Namespace, results: Results, peer: Peer, repeat: int, server: Server
) -> None:
    r = await client.resume(
        server.port,
        messages=args.resume,
        size=args.size,
        server_cpu=server.cpu_seconds,
        rss=server.rss_bytes,
    )
    results.add(peer, "resume s", r.seconds)
    results.add(peer, "resume cpu", r.server_cpu * 1e3)
    results.add(peer, "resume kib", r.rss_kib)
    results.runs.append(
        {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": "resume"}
        | {"messages": r.messages, "seconds": r.seconds, "server_cpu_s": r.server_cpu}
        | {"rss_kib": r.rss_kib}
    )
    note(
        f"  {peer.label:<12} {'resume':<14} {r.messages} messages in {r.seconds:.3f} s, "
        f"server {r.server_cpu * 1e3:.0f} ms CPU, RSS +{r.rss_kib:.0f} KiB"
    )


def selected(kind: str, args: argparse.Namespace) -> list[Peer]:
    """The peers of ``kind`` to measure, in column order; with --scrape, wsechod twice."""
    peers: list[Peer] = []
    every = {
        "echo": ECHO_PEERS,
        "relay": RELAY_PEERS,
        "handshake": HANDSHAKE_PEERS,
        "resume": RESUME_PEERS,
        "redis": REDIS_PEERS,
    }[kind]
    for peer in every:
        if peer.name in args.only:
            peers.append(peer)
            if peer.name == "wsechod" and args.scrape and kind in ("echo", "relay"):
                peers.append(SCRAPED_PEERS[kind])
        if peer.name == "wsechod" and kind == "echo" and args.workers > 1 and WORKERS in args.only:
            peers.append(workers_peer(args.workers))
    return peers


async def scrape_every(port: int, counts: dict[str, int]) -> None:
    """GET /metrics every SCRAPE_INTERVAL, reading the whole answer, as Prometheus does."""
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        answer = await reader.read()
        writer.close()
        counts["ok" if answer.startswith(b"HTTP/1.1 200 ") else "failed"] += 1
        await asyncio.sleep(SCRAPE_INTERVAL)


def make_plan(args: argparse.Namespace) -> list[tuple[Peer, str]]:
    """Every (server, scenario) of one repeat, in order; deflate with compression on, and
    only for the servers that have it (not the scraped or workers variants)."""
    plan: list[tuple[Peer, str]] = []
    for peer in selected("echo", args):
        variant = peer.scrape or peer.name == WORKERS or peer.auth is not None
        variant = variant or "--controls" in peer.argv or peer.tls
        for scenario in ("echo", "idle"):
            if scenario in args.scenarios and not (variant and scenario == "idle"):
                plan.append((peer, scenario))
        compressing = deflate_peer(peer) if "deflate" in args.scenarios else None
        if compressing is not None and not variant:
            plan.append((compressing, "deflate"))
    if "fanout" in args.scenarios:
        plan += [(p, "fanout") for p in selected("relay", args)]
    for scenario in ("handshake", "resume", "redis"):
        if scenario in args.scenarios:
            plan += [(p, scenario) for p in selected(scenario, args)]
    return plan


async def run_all(args: argparse.Namespace, results: Results) -> None:
    broken: dict[tuple[str, str, bool], str] = {}
    plan = make_plan(args)
    steps = {
        "echo": measure_echo,
        "idle": measure_idle,
        "fanout": measure_fanout,
        "deflate": measure_deflate,
        "handshake": measure_handshake,
        "resume": measure_resume,
        "redis": measure_redis,
    }
    for repeat in range(1, args.repeat + 1):
        note(f"repeat {repeat}/{args.repeat}")
        for peer, scenario in plan:
            if (peer.kind, peer.name, scenario == "deflate") in broken:
                continue
            try:
                server = Server(peer, args.server_core, args.subscribers + args.publishers)
            except PeerError as exc:
                broken[(peer.kind, peer.name, scenario == "deflate")] = str(exc)
                results.errors.append(f"{peer.label} ({peer.kind}) not measured: {exc}")
                note(f"  SKIPPED {peer.label}: {exc}")
                continue
            began = time.monotonic()
            scrapes = {"ok": 0, "failed": 0}
            scraper = (
                asyncio.create_task(scrape_every(server.port, scrapes)) if peer.scrape else None
            )
            try:
                step = functools.partial(steps[scenario], args, results, peer, repeat, server)
                await guarded(results, f"{peer.label} {scenario} (repeat {repeat})", step)
            finally:
                if scraper is not None:
                    scraper.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await scraper
                server.stop()
            took = time.monotonic() - began
            if scraper is not None:
                results.runs.append(
                    {"repeat": repeat, "peer": peer.name, "kind": peer.kind, "case": scenario}
                    | {"scrapes": scrapes["ok"], "failed_scrapes": scrapes["failed"]}
                )
                note(f"  {peer.label:<12} {scrapes['ok']} scrapes, {scrapes['failed']} failed")
                if scrapes["failed"] or not scrapes["ok"]:
                    results.errors.append(f"{peer.label} {scenario}: scrapes {scrapes}")
            note(f"  {peer.label:<12} {scenario} done in {took:.1f} s")


# Reporting ---------------------------------------------------------------------------------


def fmt(value: float, digits: int | None) -> str:
    if math.isnan(value):
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f}"


def table(args: argparse.Namespace, results: Results) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    summary: dict[str, Any] = {}
    section = None
    for fig in figures(args):
        kind = fig.kind
        peers = selected(kind, args)
        base_name, base_label = BASES[kind]
        if fig.section != section:
            section = fig.section
            lines += ["", section, f"{'':<30}" + "".join(f"{p.label:>13}" for p in peers)]
        medians = {p.name: results.median(kind, p.name, fig.key, fig.worst) for p in peers}
        cells = []
        entry: dict[str, Any] = {}
        for p in peers:
            m = medians[p.name]
            if m is None:
                cells.append("-")
                continue
            value, saturated = m
            mark = ("≥" if fig.floor else "*") if saturated else ""
            cells.append(mark + fmt(value, fig.digits))
            entry[p.name] = {"value": value, "client_saturated": saturated}
        lines.append(f"  {fig.label:<28}" + "".join(f"{c:>13}" for c in cells))
        if fig.ratios:
            bases = [(base_name, base_label)]
            if any(p.name == "ws" for p in peers):
                bases.append(("ws", "ws"))
            if any(p.name == WORKERS for p in peers):  # how the workers scale
                bases.append(("wsechod", "wsechod"))
            for base, label in bases:
                ref = medians.get(base)
                row = []
                for p in peers:
                    m = medians[p.name]
                    if m is None or ref is None or ref[0] == 0:
                        row.append("-")
                        continue
                    ratio = m[0] / ref[0]
                    row.append(("*" if m[1] or ref[1] else "") + f"{ratio:.2f}")
                    entry[p.name][f"x_{'baseline' if base == base_name else base}"] = ratio
                lines.append(f"    x {label:<26}" + "".join(f"{c:>13}" for c in row))
        summary.setdefault(section, {})[fig.label] = entry
    return "\n".join(lines), summary


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "kernel": platform.release()}
    for package in ("websockets", "picows", "uvloop", "wsechod"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
        found["node"] = node.stdout.strip()
        ws = NODE_DIR / "node_modules" / "ws" / "package.json"
        if ws.is_file():
            found["ws"] = json.loads(ws.read_text())["version"]
    return found


# Command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark wsechod against the websockets example, Node's ws and others.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a short smoke run: 1 repeat, small counts")
    add("--repeat", type=int, help="interleaved rounds, median taken (default 3; quick 1)")
    add("--seconds", type=float, help="measured window per figure (default 1.5; quick 0.5)")
    add("--warmup", type=float, help="load before each window (default 0.3; quick 0.2)")
    add("--connections", help="echo connection counts, comma-separated (default 1,50,500)")
    add("--size", type=int, default=32, help="small message size in bytes (default 32)")
    add("--big-size", type=int, default=16384, help="large message size, 0 to skip (16384)")
    add("--big-connections", type=int, default=50, help="connections for large messages")
    add("--idle", type=int, help="idle connections for memory and drain (10000; quick 1000)")
    add("--subscribers", type=int, help="fan-out subscribers (default 1000; quick 100)")
    add("--publishers", type=int, default=10, help="fan-out publishers, 1 to skip (10)")
    add("--pipeline", type=int, default=8, help="echo messages in flight, 1 to skip (8)")
    add("--handshakes", type=int, help="connections opened per handshake run (2000; quick 300)")
    add("--resume", type=int, help="messages a resuming client catches up with (10000; quick 1000)")
    add("--only", help="peers, comma-separated: " + ",".join(sorted(peer_names())))
    add("--scenarios", default=",".join(SCENARIOS), help="any of " + ",".join(SCENARIOS))
    add("--deflate-messages", type=int, help="messages per deflate case (default 300; quick 50)")
    add(
        "--deflate-cases",
        default="text/256,random/256,text/32768",
        help="deflate cases, PAYLOAD/FRAGMENT comma-separated; payload text or random "
        "(default text/256,random/256,text/32768)",
    )
    add("--scrape", action="store_true", help="also measure wsechod scraped every second")
    add(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="also measure wsechod with this many workers, on every core (default: the "
        "cores this process may use; 0 or 1: not)",
    )
    add("--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write")
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = {
        "repeat": 1 if quick else 3,
        "seconds": 0.5 if quick else 1.5,
        "warmup": 0.2 if quick else 0.3,
        "connections": "1,50" if quick else "1,50,500",
        "idle": 1000 if quick else 10_000,
        "subscribers": 100 if quick else 1000,
        "handshakes": 300 if quick else 2000,
        "resume": 1000 if quick else 10_000,
        "deflate_messages": 50 if quick else 300,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.connections = [int(n) for n in str(args.connections).split(",") if n]
    except ValueError:
        parser.error("--connections: comma-separated integers")
    args.only = set(args.only.split(",")) if args.only else peer_names()
    if unknown := args.only - peer_names():
        parser.error(f"--only: unknown peer(s) {', '.join(sorted(unknown))}")
    args.scenarios = set(args.scenarios.split(","))
    if unknown := args.scenarios - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {', '.join(sorted(unknown))}")
    counts = [args.repeat, args.idle, args.subscribers, args.handshakes, args.resume]
    counts += [args.big_connections, args.publishers, args.pipeline]
    counts += args.connections
    if min(counts) < 1 or args.seconds <= 0 or args.warmup < 0 or args.size < 1:
        parser.error("counts, sizes and --seconds must be positive")
    args.big_case = (args.big_connections, args.big_size)
    args.deflate_cases = [c for c in args.deflate_cases.split(",") if c]
    for c in args.deflate_cases:
        payload, _, fragment = c.partition("/")
        if payload not in ("text", "random") or not fragment.isdigit() or int(fragment) < 1:
            parser.error(f"--deflate-cases: {c!r} is not text/N or random/N")
    if args.deflate_messages < 1:
        parser.error("--deflate-messages must be positive")
    return args


def peer_names() -> set[str]:
    peers = (*ECHO_PEERS, *RELAY_PEERS, *HANDSHAKE_PEERS, *RESUME_PEERS, *REDIS_PEERS)
    return {p.name for p in peers} | {WORKERS}


def place(args: argparse.Namespace) -> None:
    """Servers on the first allowed core, this client on the second, if there are two."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1 and shutil.which("taskset"):
        args.server_core, client_core = cores[0], cores[1]
        os.sched_setaffinity(0, {client_core})
        args.placement = f"servers on core {args.server_core}, client on core {client_core}"
    else:
        args.server_core = None
        args.placement = "one core (or no taskset): servers and client share it, ratios only"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.idle, args.subscribers + 1, args.handshakes, *args.connections) + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            sys.exit(f"bench: --idle {args.idle} needs {need} open files; hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def main() -> None:
    args = parse_args()
    place(args)
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    note(
        f"make bench: {args.repeat} interleaved repeat(s), {args.seconds:g} s windows after "
        f"{args.warmup:g} s warm-up; {args.placement}"
    )
    results = Results()
    redis_server = None
    try:
        if "redis" in args.scenarios:
            try:
                redis_server = start_redis(args.server_core)
            except PeerError as exc:
                results.errors.append(f"fan-out through Redis not measured: {exc}")
        uvloop.run(run_all(args, results))
    finally:
        kill_all()
        if redis_server is not None:
            redis_server.kill()
    elapsed = time.monotonic() - started

    text, summary = table(args, results)
    found = versions()
    print(
        f"wsechod benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
        f"median of {args.repeat}, {args.placement}; "
        + ", ".join(f"{k} {v}" for k, v in found.items())
    )
    print(text)
    print(
        "\nx example: value ÷ the websockets legacy-API example's (fan-out: ÷ the broadcast() "
        "relay's; handshakes: x no token, ÷ wsechod's without auth); x ws: ÷ Node ws's. "
        '+jwt HS256: wsechod with auth = "jwt", every client with a token. Higher is better '
        "for round trips/s, deliveries/s and handshakes/s, lower for the rest.\n"
        f"≥ a throughput measured with the client core ≥{SATURATED:.0%} busy: the client was "
        "the bottleneck, the server can do at least this (trust server CPU µs/msg instead); "
        "* the same run's latencies (they include client queueing) and ratios involving them."
    )
    if args.workers > 1 and WORKERS in args.only:
        print(
            f"wsechod {args.workers}w: {args.workers} worker processes on every core, the "
            "client's core included (x wsechod: ÷ one process on the server core); its server "
            "CPU and core busy % add up every process (200 % is two cores)."
        )
    for error in results.errors:
        print(f"error: {error}")
    print(f"total time {elapsed:.0f} s")
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "total_seconds": elapsed,
        "placement": args.placement,
        "versions": found,
        "args": {
            k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
        },
        "figures": summary,
        "runs": results.runs,
        "errors": results.errors,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
