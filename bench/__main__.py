"""Run both servers pinned to one core, load them from the other, print figures and ratios.

Figures: echoed messages per second, server CPU time per echoed message (user + system,
from /proc, so it does not depend on how fast the client is), and resident memory per idle
connection.
"""

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench import load

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TWO_CORES = len(os.sched_getaffinity(0)) > 1


@dataclass
class Result:
    name: str
    rate: float
    cpu_us: float
    idle_kib: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def start(name: str, core: int, *extra: str) -> tuple[subprocess.Popen[str], int]:
    pin = ["taskset", "-c", str(core)] if TWO_CORES and shutil.which("taskset") else []
    if name == "wsechod":
        cmd = [
            sys.executable,
            "-m",
            "wsechod",
            "--config",
            "",
            "--port",
            "0",
            "--log-format",
            "console",
            "--max-connections",
            "0",
            *extra,
        ]
    else:
        cmd = [sys.executable, "-m", "bench.baseline", "0"]
    proc = subprocess.Popen(
        [*pin, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        if found:
            # Keep reading so a chatty server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(found.group(1))
    raise RuntimeError(f"{name} did not start")


async def measure(name: str, port: int, pid: int, args: argparse.Namespace) -> Result:
    payload = os.urandom(args.size)
    clients = await load.open_clients(port, args.connections, payload)
    await load.run_for(clients, 0.5)  # warm up
    await asyncio.sleep(0.1)  # let the last echoes land
    cpu0 = cpu_seconds(pid)
    total = await load.run_for(clients, args.seconds)
    cpu1 = cpu_seconds(pid)
    load.close_all(clients)

    rss0 = rss_bytes(pid)
    idle = await load.open_clients(port, args.idle, payload)
    await asyncio.sleep(0.5)
    rss1 = rss_bytes(pid)
    load.close_all(idle)
    await asyncio.sleep(0.5)
    return Result(
        name, total / args.seconds, (cpu1 - cpu0) / total * 1e6, (rss1 - rss0) / args.idle / 1024
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--receivers", type=int, default=20, help="relay fan-out receivers")
    args = parser.parse_args()
    if args.connections < 1 or args.idle < 1 or args.seconds <= 0:
        parser.error("--connections, --idle and --seconds must be positive")

    print(
        f"echo, {args.connections} connections, {args.size}-byte ping-pong for "
        f"{args.seconds:g} s; {args.idle} idle connections for memory; server on core 0"
    )
    if TWO_CORES:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})  # client off core 0
    results = []
    for name in ("baseline", "wsechod"):
        proc, port = start(name, core=0)
        try:
            results.append(uvloop.run(measure(name, port, proc.pid, args)))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'server':<10} {'msgs/s':>10} {'CPU µs/msg':>11} {'KiB/idle conn':>14}")
    for r in results:
        print(f"{r.name:<10} {r.rate:>10.0f} {r.cpu_us:>11.1f} {r.idle_kib:>14.1f}")
    base, ours = results
    print(
        f"ratio wsechod/baseline: throughput x{ours.rate / base.rate:.2f}, "
        f"CPU per message x{ours.cpu_us / base.cpu_us:.2f}, "
        f"memory per idle connection x{ours.idle_kib / base.idle_kib:.2f} (lower is better "
        "for CPU and memory)"
    )
    proc, port = start("wsechod", 0, "--mode", "relay")
    try:
        cpu0 = cpu_seconds(proc.pid)
        deliveries = uvloop.run(
            load.fan_out(port, args.receivers, os.urandom(args.size), args.seconds)
        )
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"relay fan-out, 1 publisher to {args.receivers} receivers on one channel, "
        f"{args.size}-byte messages: {deliveries / args.seconds:.0f} deliveries/s, "
        f"{cpu / deliveries * 1e6:.2f} µs CPU per delivery"
    )


if __name__ == "__main__":
    main()
