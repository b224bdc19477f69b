"""``python -m bench.profile [echo|fanout|storm [tls]|deflate [random|text]|handshake]``: where
wsechod's server CPU goes, sampled with py-spy (``pip install py-spy``; not a dependency)
while the bench's load client runs: the fan-out to 1,000 subscribers (default), echo at 50
connections, 32 B messages (either over TLS with ``tls``), compressed echo
(``bench.deflate``) of 32-128 KiB messages (random bytes by default, or text) in 256-byte
fragments, opening handshakes (1,000 at a time, closed, again), or connections opened and
closed one after the other (``bench.storm``, 50 at a time). Prints the lines that
use the most time (their own samples) and the calls that contain the most.

A figure that misses its target gets read here before anyone optimizes: when most samples
sit in ``transport.write`` (the send system call, which py-spy sees as the line calling
it), the cost is the kernel's, the same for every server, and no Python change recovers it.
"""

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from bench import client, deflate, storm, tls
from bench.peers import ECHO_PEERS, RELAY_PEERS, Server, deflate_peer

SUBSCRIBERS, CONNECTIONS, SIZE = 1000, 50, 32
WARMUP, SECONDS, SAMPLED = 2.0, 10.0, 6  # the sampling starts after the warm-up
TOP = 12
DEFLATE_MESSAGES = 600  # enough to outlast the warm-up and the sampling


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(found, os.X_OK):
        raise SystemExit("py-spy not found: pip install py-spy")
    return found


def summary(raw: Path) -> str:
    """Collapsed stacks (``frame;frame;... count``): self and inclusive shares."""
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            within[frame] += n
    lines = [f"{total} samples", "own time (the line running):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    lines.append("within (the call and everything under it; not the entry points, 100%):")
    inner = [(f, n) for f, n in within.most_common() if n < total][:TOP]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inner]
    return "\n".join(lines)


async def load(scenario: str, server: Server, spy: list[str], payload: str) -> str:
    async def sample() -> None:
        await asyncio.sleep(WARMUP + 1)
        await asyncio.to_thread(subprocess.run, spy, check=True, capture_output=True)

    sampling = asyncio.ensure_future(sample())
    if scenario == "deflate":
        case = deflate.Case(messages=DEFLATE_MESSAGES, payload=payload, fragment=256)
        d = await deflate.deflate_echo(
            server.port, case, deflate.make_messages(case), server.cpu_seconds
        )
        w = d.window
        figure = f"{w.server_cpu / w.events * 1e3:.2f} ms of server CPU per message"
    elif scenario == "storm":
        cycles, cpu, end = 0, 0.0, asyncio.get_running_loop().time() + WARMUP + SECONDS
        context = tls.client_context() if server.peer.tls else None
        while asyncio.get_running_loop().time() < end:
            w = await storm.storm(
                server.port, cycles=1000, server_cpu=server.cpu_seconds, tls=context
            )
            cycles, cpu = cycles + w.events, cpu + w.server_cpu
        await sampling
        return f"{cpu / cycles * 1e6:.1f} µs of server CPU per connection opened and closed"
    elif scenario == "handshake":
        opened, cpu, end = 0, 0.0, asyncio.get_running_loop().time() + WARMUP + SECONDS
        while asyncio.get_running_loop().time() < end:
            w = await client.handshakes(
                server.port, connections=1000, server_cpu=server.cpu_seconds
            )
            opened, cpu = opened + w.events, cpu + w.server_cpu
        await sampling
        return f"{cpu / opened * 1e6:.1f} µs of server CPU per handshake"
    elif scenario == "fanout":
        w, _ = await client.fan_out(
            server.port,
            subscribers=SUBSCRIBERS,
            size=SIZE,
            warmup=WARMUP,
            seconds=SECONDS,
            server_cpu=server.cpu_seconds,
            tls=tls.client_context() if server.peer.tls else None,
        )
        figure = f"{w.server_cpu / w.events * 1e6:.2f} µs of server CPU per delivery"
    else:
        r = await client.echo(
            server.port,
            connections=CONNECTIONS,
            size=SIZE,
            warmup=WARMUP,
            seconds=SECONDS,
            server_cpu=server.cpu_seconds,
            tls=tls.client_context() if server.peer.tls else None,
        )
        w = r.window
        figure = f"{w.server_cpu / w.events * 1e6:.2f} µs of server CPU per round trip"
    await sampling
    return f"{figure}, client core {100 * w.client_cpu / w.seconds:.0f}% busy"


def main() -> None:
    scenario = sys.argv[1] if len(sys.argv) > 1 else "fanout"
    variant = sys.argv[2] if len(sys.argv) > 2 else ""
    payload = variant or "random"
    if (scenario, variant) not in {
        *((s, v) for s in ("echo", "fanout", "storm") for v in ("", "tls")),
        *(("deflate", v) for v in ("", "random", "text")),
        ("handshake", ""),
    }:
        raise SystemExit(
            "usage: python -m bench.profile "
            "[echo|fanout|storm [tls]|deflate [random|text]|handshake]"
        )
    peers = RELAY_PEERS if scenario == "fanout" else ECHO_PEERS
    name = "wsechod-tls" if variant == "tls" else "wsechod"
    peer = next(p for p in peers if p.name == name)
    if scenario == "deflate":
        peer = deflate_peer(peer) or peer
    cores = sorted(os.sched_getaffinity(0))
    server = Server(peer, cores[0], SUBSCRIBERS + 1)
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    try:
        with tempfile.TemporaryDirectory() as scratch:
            raw = Path(scratch) / "stacks.txt"
            spy = [py_spy(), "record", "--pid", str(server.pid), "--duration", str(SAMPLED)]
            spy += ["--rate", "250", "--nonblocking", "--format", "raw", "-o", str(raw)]
            print(uvloop.run(load(scenario, server, spy, payload)))
            print(summary(raw))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
