"""``python -m bench.memory``: what a wsechod process keeps after its connections closed,
with permessage-deflate and without, and what ``malloc_trim`` gives back.

The server runs in this process, on a uvloop loop in the main thread as the command runs
it, so that glibc's allocator (``mallinfo2``, ``malloc_trim``) and ``tracemalloc`` can be
read from inside. The clients run in child processes (websockets' client, compression on or
off): ``--connections`` connections open at once, each echoing ``--messages`` text messages
of ``--size`` bytes, then all closed; ``--live N`` more stay open through every round.
Each round reports RSS, what malloc has handed out (in use) and holds free (main arena),
tracemalloc's total with ``--trace``: before, once closed, after a collection, once
settled (a few seconds later: what the server gives back by itself), and after a
``malloc_trim(0)`` called here, with how long it took.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import uvloop

from wsechod.runtime.embedded import running

SETTLE = 3.0  # seconds after the close: the server's own trim comes a second after

CLIENT = r"""
import asyncio, random, sys
from websockets.asyncio.client import connect

WORDS = ("alpha", "bravo", "charlie", "delta")

async def main(url, n, compression, messages, size):
    rng = random.Random(1)
    slots = asyncio.Semaphore(100)
    async def opened():
        async with slots:
            return await connect(url, compression=compression, max_size=None)
    conns = await asyncio.gather(*(opened() for _ in range(n)))  # all open at once
    async def echo(ws):
        for _ in range(messages):
            message = " ".join(rng.choice(WORDS) for _ in range(size // 6))[:size]
            await ws.send(message)
            assert await ws.recv() == message
    await asyncio.gather(*(echo(ws) for ws in conns))
    if hold:  # live connections beside the rounds: wait until told to go
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(ws.close() for ws in conns))

url, n, compression, messages, size, hold = sys.argv[1:]
compression = None if compression == "none" else compression
hold = hold == "hold"
asyncio.run(main(url, int(n), compression, int(messages), int(size)))
"""


class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
LIBC.mallinfo2.restype = Mallinfo2
LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
LIBC.malloc_trim.restype = ctypes.c_int


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Snapshot:
    rss_mib: float
    heap_in_use_mib: float  # uordblks + hblkhd: what malloc has handed out
    heap_free_mib: float  # fordblks: free inside the heap, not returned to the system
    traced_mib: float | None  # tracemalloc's current total

    @classmethod
    def take(cls) -> Snapshot:
        info = LIBC.mallinfo2()
        traced = tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else None
        return cls(
            rss_kib() / 1024,
            (info.uordblks + info.hblkhd) / 2**20,
            info.fordblks / 2**20,
            traced,
        )


async def one_round(
    url: str, args: argparse.Namespace, compression: str, port: int
) -> dict[str, Any]:
    gc.collect()
    before = Snapshot.take()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        url,
        str(args.connections),
        compression,
        str(args.messages),
        str(args.size),
        "go",
    )
    if await client.wait():
        raise RuntimeError(f"the client failed with status {client.returncode}")
    deadline = time.monotonic() + 30
    # Polled: the engine's side closes after the client's, and nothing here can wait on it.
    while await open_connections(port) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    closed = Snapshot.take()  # before a collection: what reference counting freed
    collected = gc.collect()
    after_gc = Snapshot.take()
    await asyncio.sleep(SETTLE)
    settled = Snapshot.take()
    top = None
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")[:5]
        top = [f"{s.size / 2**20:.2f} MiB {s.traceback}" for s in stats]
    t0 = time.perf_counter()
    LIBC.malloc_trim(0)
    trim_ms = (time.perf_counter() - t0) * 1e3
    trimmed = Snapshot.take()
    return {
        "compression": compression,
        "before": vars(before),
        "closed": vars(closed),
        "collected": collected,
        "after_gc": vars(after_gc),
        "settled": vars(settled),
        "trimmed": vars(trimmed),
        "trim_ms": trim_ms,
        "top": top,
    }


async def open_connections(port: int) -> int:
    """The engine's open connections, from its own /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: memory\r\n\r\n")
    page = (await reader.read()).decode()
    writer.close()
    for line in page.splitlines():
        if line.startswith("wsechod_connections_open"):
            return int(float(line.split()[-1]))
    raise RuntimeError("no wsechod_connections_open in /metrics")


async def main(args: argparse.Namespace) -> None:
    if args.trace:
        tracemalloc.start()
    async with running(port=0, compression="deflate", max_connections=0) as server:
        live = None
        if args.live:  # connections that stay open through the rounds: a bigger live heap
            live = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                server.url,
                str(args.live),
                "deflate",
                "1",
                str(args.size),
                "hold",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert live.stdout is not None
            await live.stdout.readline()
        for compression in args.order:
            r = await one_round(server.url, args, compression, server.port)
            print(json.dumps(r), flush=True)
        if live is not None:
            assert live.stdin is not None
            live.stdin.close()
            await live.wait()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--order", default="none,deflate,none,deflate")
    parser.add_argument("--trace", action="store_true", help="tracemalloc on (slow)")
    parser.add_argument("--live", type=int, default=0, help="deflate connections kept open")
    args = parser.parse_args()
    args.order = args.order.split(",")
    return args


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
