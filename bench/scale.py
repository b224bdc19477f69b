"""``python -m bench.scale``: wsechod at 100,000 idle connections, and one process at its
open-files limit.

These machines cap open files at 20,000 per process (a hard limit), so 100,000 connections
are one daemon with workers (6 by default) and as many client processes
(``bench.fleet``), each from its own loopback source address. The run raises what an
operator would for it, and says so: ``max_connections = 0`` (the default 10,000 is for the
whole server), the open-files limit to its hard limit (wsechod does that itself), and no
per-address limit (``max_connections_per_ip`` is 0 by default). It reports:

- RSS per connection (the main process and every worker; growth over the idle server);
- the CPU the keepalive costs at the default ``ping_interval`` (20 s): the server's CPU over
  one interval, in which every connection is pinged once and answers;
- the drain: from SIGTERM to the main process's exit, every client answering the close;
- a restart (stop, then start on the same port) and a recycle of every worker at once,
  with every client reconnecting as soon as it is closed: the time until all are back, the
  longest a client was away, the peak RSS, and ``/healthz`` asked every 0.1 s throughout;
- then one process without workers at about 19,000 connections: RSS per connection plain,
  over TLS, and as relay members (19 channels), and its keepalive CPU.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import client, tls
from bench.peers import PAGE, ROOT, Peer, Server

PER_FLEET = 18_000  # connections per client process, below its 20,000 open files
BACK_WITHIN = 300.0  # seconds for every client to be back after a restart or recycle
HEALTH_EVERY = 0.1
Figures = dict[str, float]


def reaped_cpu() -> float:
    """CPU seconds of this process's children that have exited and been waited for
    (with theirs: a daemon's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kernel_kib() -> int:
    """The kernel's slab memory (sockets, their files and epoll entries) and the pages
    TCP holds for socket buffers, in KiB."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    slab = int(meminfo["Slab"].split()[0])
    tcp = Path("/proc/net/sockstat").read_text().split("TCP:", 1)[1].split("\n", 1)[0].split()
    return slab + int(tcp[tcp.index("mem") + 1]) * PAGE // 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tree(server: Server) -> list[int]:
    return [server.pid, *server.children()]


def rss(server: Server) -> int:
    """The resident memory of the main process and its workers, in bytes."""
    total = 0
    for pid in tree(server):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


class Fleets:
    """The client processes, each from 127.0.0.(10+i), spoken to a line at a time."""

    def __init__(self, port: int, count: int, *, tls_on: bool = False) -> None:
        env = os.environ | tls.environ() if tls_on else None
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.fleet", f"127.0.0.{10 + i}", str(port)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(count)
        ]

    async def ask(self, commands: list[str]) -> list[dict[str, object]]:
        """One command to each client process (in the same order), their answers."""

        def one(proc: "subprocess.Popen[str]", command: str) -> dict[str, object]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"a client process exited (status {proc.poll()})")
            return dict(json.loads(answer))

        return list(
            await asyncio.gather(
                *(asyncio.to_thread(one, p, c) for p, c in zip(self.procs, commands, strict=True))
            )
        )

    async def all(self, command: str) -> list[dict[str, object]]:
        return await self.ask([command] * len(self.procs))

    async def total(self, key: str) -> int:
        return sum(int(s[key]) for s in await self.all("status"))  # type: ignore[call-overload]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Health:
    """``/healthz`` asked every HEALTH_EVERY seconds: answers, failures, slowest."""

    port: int
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    slowest: float = 0.0

    async def watch(self) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 5
                )
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                if answer.startswith(b"HTTP/1.1 200 "):
                    self.answered += 1
                else:
                    self.failed.append(answer[:40].decode(errors="replace"))
            except (OSError, TimeoutError) as exc:
                self.failed.append(repr(exc))
            self.slowest = max(self.slowest, time.perf_counter() - t0)
            await asyncio.sleep(HEALTH_EVERY)


def note(text: str) -> None:
    print(text, flush=True)


async def healthy(port: int, within: float = 60.0, context: ssl.SSLContext | None = None) -> None:
    """Until ``/healthz`` answers 200 (over TLS with ``context``)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
            answer = await reader.read()
            writer.close()
            if answer.startswith(b"HTTP/1.1 200 "):
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no 200 from /healthz on {port} within {within} s")


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


async def keepalive(server: Server, fleets: Fleets, seconds: float) -> tuple[float, int]:
    """Server CPU seconds over ``seconds``, and the pings answered meanwhile."""
    p0, c0 = await fleets.total("pings"), server.cpu_seconds()
    await asyncio.sleep(seconds)
    return server.cpu_seconds() - c0, await fleets.total("pings") - p0


async def back(server: Server, fleets: Fleets, want: int, old: set[int]) -> tuple[float, int]:
    """Seconds until ``want`` connections are open again (and the ``old`` workers have
    exited), and the peak RSS meanwhile."""
    t0, peak = time.perf_counter(), 0
    while time.perf_counter() - t0 < BACK_WITHIN:
        peak = max(peak, rss(server))
        if not old & set(server.children()) and await fleets.total("open") >= want:
            return time.perf_counter() - t0, peak
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{await fleets.total('open')} of {want} back within {BACK_WITHIN} s")


async def away(fleets: Fleets) -> tuple[float, float, int]:
    """The longest and the 99th percentile time a client was away, and retries."""
    statuses = await fleets.all("status")
    worst = max(float(s["away_max"]) for s in statuses)  # type: ignore[arg-type]
    p99 = max(float(s["away_p99"]) for s in statuses)  # type: ignore[arg-type]
    return worst, p99, sum(int(s["retries"]) for s in statuses)  # type: ignore[call-overload]


async def closes(fleets: Fleets, key: str = "closes") -> dict[str, int]:
    """Close codes the clients received (or, with "refusals", HTTP statuses), summed."""
    found: dict[str, int] = {}
    for status in await fleets.all("status"):
        for code, n in status[key].items():  # type: ignore[attr-defined]
            found[code] = found.get(code, 0) + n
    return found


async def refused(fleets: Fleets) -> dict[str, int]:
    return await closes(fleets, "refusals")


def daemon(port: int, workers: int, *extra: str, tls_on: bool = False) -> Server:
    argv = ("wsechod", "--port", str(port), *extra)
    if workers:
        argv += ("--workers", str(workers))
    peer = Peer("wsechod-scale", "wsechod", "echo", argv, pinned=False, tls=tls_on)
    return Server(peer, None)


async def big(args: argparse.Namespace) -> dict[str, float]:
    """100,000 connections to one daemon with workers: memory, keepalive, drain, storms."""
    n, port = args.connections, free_port()
    found: dict[str, float] = {"connections": n, "workers": args.workers}
    servers = [daemon(port, args.workers)]
    fleets = Fleets(port, math.ceil(n / PER_FLEET))
    try:
        await idle(args, servers[0], fleets, found)
        await restart(args, servers, fleets, found)
    finally:
        fleets.close()
        for server in servers:
            server.stop(60)
    return found


async def idle(args: argparse.Namespace, server: Server, fleets: Fleets, found: Figures) -> None:
    """Open them all; memory; the keepalive's CPU over one ping interval."""
    n = args.connections
    await healthy(server.port)
    rss0, slab0 = rss(server), kernel_kib()
    opened = await fleets.ask([f"open {k}" for k in shares(n, len(fleets.procs))])
    failed = sum(int(o["failed"]) for o in opened)  # type: ignore[call-overload]
    took = max(float(o["seconds"]) for o in opened)  # type: ignore[arg-type]
    if failed:
        raise RuntimeError(f"{failed} of {n} connections failed to open")
    note(f"{n} connections open in {took:.1f} s ({n / took:.0f}/s)")
    await asyncio.sleep(1)
    found["kib_per_connection"] = (rss(server) - rss0) / n / 1024
    found["rss_mib"] = rss(server) / 2**20
    # Both ends of each connection are on this machine: the kernel's memory per socket.
    found["kernel_kib_per_socket"] = (kernel_kib() - slab0) / (2 * n)
    cpu, pings = await keepalive(server, fleets, args.window)
    found["keepalive_core_pct_per_20k"] = 100 * cpu / args.window / (n / 20_000)
    found["pings_answered"] = pings
    note(
        f"RSS {found['rss_mib']:.0f} MiB, {found['kib_per_connection']:.2f} KiB per "
        f"connection (the kernel: {found['kernel_kib_per_socket']:.2f} KiB per socket); "
        f"keepalive over {args.window:.0f} s: {pings} pings, "
        f"{found['keepalive_core_pct_per_20k']:.2f}% of a core per 20,000 connections"
    )


async def drain(server: Server) -> tuple[float, int, float]:
    """SIGTERM, every client answering its close: the seconds to the main process's exit,
    its exit status, and the daemon's CPU seconds meanwhile."""
    cpu0, reaped0 = server.cpu_seconds(), reaped_cpu()
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    if not await client.wait_exit(server.proc, 60):
        raise TimeoutError("the daemon did not exit within 60 s of SIGTERM")
    took, status = time.perf_counter() - t0, server.proc.wait()
    # The main process's whole life (its workers' too), less what it had used before.
    return took, status, reaped_cpu() - reaped0 - cpu0


async def restart(
    args: argparse.Namespace, servers: list[Server], fleets: Fleets, found: Figures
) -> None:
    """The drain (SIGTERM, every client answering the close), the same command again with
    every client coming back on its own, then a recycle of every worker at once (the new
    server is added to ``servers``)."""
    server = servers[0]
    n, port = args.connections, server.port
    await fleets.all("reconnect")
    found["drain_s"], found["exit_status"], found["drain_server_cpu_s"] = await drain(server)
    drained = await closes(fleets)
    found["closed_1001"] = drained.get("1001", 0)
    note(
        f"drain of {n}: {found['drain_s']:.2f} s, exit {found['exit_status']}, closes "
        f"{drained}; the daemon's CPU meanwhile {found['drain_server_cpu_s']:.2f} s"
    )
    health = Health(port)
    t0 = time.perf_counter()
    server = daemon(port, args.workers)
    servers.append(server)
    watcher = asyncio.ensure_future(health.watch())
    try:
        await healthy(port)
        took, peak = await back(server, fleets, n, set())
        found["restart_back_s"] = time.perf_counter() - t0
        found["restart_peak_rss_mib"] = peak / 2**20
        worst, p99, retries = await away(fleets)
        found["restart_away_max_s"], found["restart_away_p99_s"] = worst, p99
        refusals = await refused(fleets)
        found["restart_refusals"] = sum(refusals.values())
        found["restart_server_cpu_s"] = server.cpu_seconds()  # its whole life so far
        note(
            f"restart: all {n} back {found['restart_back_s']:.1f} s after the start "
            f"({took:.1f} s after it answered /healthz); away at most {worst:.1f} s (p99 "
            f"{p99:.1f} s), {retries} attempts refused (by HTTP: {refusals or 'none'}); "
            f"the daemon's CPU {found['restart_server_cpu_s']:.1f} s; peak RSS "
            f"{peak / 2**20:.0f} MiB"
        )
        before = await closes(fleets)
        await fleets.all("forget")
        workers = server.children()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        took, peak = await back(server, fleets, n, set(workers))
        worst, p99, retries = await away(fleets)
        refusals = await refused(fleets)
        recycled = (await closes(fleets)).get("1001", 0) - before.get("1001", 0)
        found["recycle_back_s"], found["recycle_peak_rss_mib"] = took, peak / 2**20
        found["recycle_away_max_s"], found["recycle_closed_1001"] = worst, recycled
        found["recycle_away_p99_s"] = p99
        note(
            f"recycle of {len(workers)} workers: {recycled} clients closed 1001, all back "
            f"in {took:.1f} s; away at most {worst:.1f} s (p99 {p99:.1f} s), {retries} "
            f"attempts refused (by HTTP: {refusals or 'none'}); peak RSS {peak / 2**20:.0f} MiB"
        )
    finally:
        watcher.cancel()
    found["healthz_answered"] = health.answered
    found["healthz_failed"] = len(health.failed)
    found["healthz_slowest_s"] = health.slowest
    note(
        f"/healthz during both: {health.answered} answered 200, {len(health.failed)} not "
        f"{health.failed[:3]}, slowest {health.slowest * 1e3:.0f} ms"
    )


async def one_process(args: argparse.Namespace) -> Figures:
    """One process without workers near its open-files limit: plain, TLS, relay."""
    n, found = args.per_process, {}
    for case, extra, tls_on in (
        ("plain", (), False),
        ("tls", (), True),
        ("relay", ("--mode", "relay", "--max-channel-members", str(n)), False),
    ):
        port = free_port()
        server = daemon(port, 0, *extra, tls_on=tls_on)
        fleets = Fleets(port, 1, tls_on=tls_on)
        try:
            await healthy(port, context=tls.client_context() if tls_on else None)
            rss0 = rss(server)
            if case == "relay":  # 19 channels
                for i, k in enumerate(shares(n, 19)):
                    await fleets.all(f"open {k} /room-{i}")
            else:
                await fleets.all(f"open {n}")
            opened = await fleets.total("open")
            if opened != n:
                raise RuntimeError(f"{case}: {opened} of {n} open")
            await asyncio.sleep(1)
            found[f"{case}_kib_per_connection"] = (rss(server) - rss0) / n / 1024
            line = f"one process, {case}: {found[f'{case}_kib_per_connection']:.2f} KiB/connection"
            if case == "plain":
                cpu, pings = await keepalive(server, fleets, args.window)
                found["one_keepalive_core_pct_per_20k"] = 100 * cpu / args.window / (n / 20_000)
                line += f", keepalive {found['one_keepalive_core_pct_per_20k']:.2f}% of a core"
                line += f" per 20,000 ({pings} pings)"
                took, _, cpu = await drain(server)
                found["one_drain_s"], found["one_drain_us_per_connection"] = took, cpu / n * 1e6
                line += f"; drain {took:.2f} s, {cpu / n * 1e6:.0f} µs of CPU per connection"
            note(line)
        finally:
            fleets.close()
            server.stop(60)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--per-process", type=int, default=19_000)
    parser.add_argument("--window", type=float, default=20.0, help="keepalive window, s")
    parser.add_argument("--only", default="big,process", help="big, process or both")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "scale.json")
    args = parser.parse_args()
    found: dict[str, float] = {}
    if "big" in args.only:
        found |= uvloop.run(big(args))
    if "process" in args.only:
        found |= uvloop.run(one_process(args))
    args.json.write_text(json.dumps(found, indent=1) + "\n")
    note(f"wrote {args.json}")


if __name__ == "__main__":
    main()
