"""``python -m bench.deflate``: permessage-deflate echo of large fragmented messages, wsechod
against websockets' own servers, interleaved in one run with the same client.

The client (this file, a plain ``asyncio.Protocol`` on uvloop) sends one compressed message at
a time, in fragments, and waits for the whole echo before the next: the figure is the time for
the batch of messages and the server's CPU per message. Its messages and frames are built
before the clock starts, so what it does while timed is one write per message, parsing the
echo and inflating it to check it. Two ways to fragment:

- ``data``: the message is cut into fragments of that size, each compressed with a sync
  flush (websockets' client sending an iterable does this);
- ``wire``: the message is compressed whole and its compressed bytes cut into frames.

Payloads are ``text`` (JSON-like records, which deflate shrinks about 6x) or ``random``
(incompressible bytes, sent as binary messages).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop
from websockets.speedups import apply_mask

from bench.client import Window, client_cpu
from bench.peers import ECHO_PEERS, Peer, Server
from bench.peers import wsechod as wsechod_args

TAIL = b"\x00\x00\xff\xff"
OFFER = "permessage-deflate; client_max_window_bits"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WORDS = [f"{w}{i}" for i, w in enumerate(("alpha", "bravo", "charlie", "delta", "echo", "golf"))]


@dataclass(frozen=True)
class Case:
    """One benchmark case: how many messages, how big, how fragmented, of what."""

    messages: int = 1000
    smallest: int = 32 * 1024
    largest: int = 128 * 1024
    fragment: int = 256
    split: str = "data"  # "data" or "wire"
    payload: str = "text"  # "text" or "random"

    @property
    def key(self) -> str:
        return f"deflate {self.payload} {self.split}/{self.fragment}"


def make_messages(case: Case, seed: int = 7) -> list[bytes]:
    """The same messages for every server: seeded, sizes uniform in [smallest, largest]."""
    rng = random.Random(seed)
    out = []
    for i in range(case.messages):
        size = rng.randint(case.smallest, case.largest)
        if case.payload == "random":
            out.append(rng.randbytes(size))
            continue
        parts: list[str] = []
        n = 0
        while n < size:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            record = f'{{"id":{i * 1000 + len(parts)},"v":{rng.random():.6f},"text":"{text}"}},'
            parts.append(record)
            n += len(record)
        out.append("".join(parts)[:size].encode())
    return out


def client_frame(opcode: int, payload: bytes, fin: bool, rsv1: bool) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def wire(case: Case, messages: list[bytes], wbits: int, reset: bool) -> list[bytes]:
    """Every message as the bytes the client writes, compressed with the negotiated window
    (and context takeover unless ``reset``)."""
    opcode = OP_BINARY if case.payload == "random" else OP_TEXT
    encoder = zlib.compressobj(wbits=-wbits, memLevel=8)
    out = []
    for message in messages:
        if reset:
            encoder = zlib.compressobj(wbits=-wbits, memLevel=8)
        if case.split == "wire":
            data = encoder.compress(message) + encoder.flush(zlib.Z_SYNC_FLUSH)
            data = data[:-4]
            pieces = [data[i : i + case.fragment] for i in range(0, len(data), case.fragment)]
        else:
            pieces = []
            step = case.fragment
            for i in range(0, len(message), step):
                piece = encoder.compress(message[i : i + step]) + encoder.flush(zlib.Z_SYNC_FLUSH)
                pieces.append(piece[:-4] if i + step >= len(message) else piece)
        frames = [
            client_frame(opcode if i == 0 else OP_CONT, p, i == len(pieces) - 1, i == 0)
            for i, p in enumerate(pieces)
        ]
        out.append(b"".join(frames))
    return out


class Failed(Exception):
    """The server answered something else than the exact echo."""


@dataclass
class Run:
    expected: list[bytes]
    frames: list[bytes]
    index: int = 0
    server_frames: int = 0
    server_bytes: int = 0
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DeflateClient(asyncio.Protocol):
    """Handshake, then ping-pong of whole messages; the echo is inflated and compared."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.opened: asyncio.Future[tuple[int, bool, int]] = (
            asyncio.get_running_loop().create_future()
        )
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.decoder: zlib._Decompress = zlib.decompressobj(wbits=-15)
        self.server_reset = False
        self.run: Run | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {OFFER}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            self.opened.set_result(self._negotiated(head.decode("latin-1")))
            data = rest
        self.buf += data
        self._parse()

    def _negotiated(self, head: str) -> tuple[int, bool, int]:
        """(client window bits, client_no_context_takeover, server window bits)."""
        lines = head.split("\r\n")
        if " 101 " not in lines[0]:
            raise Failed(f"handshake refused: {lines[0]}")
        ext = next(
            (
                line.split(":", 1)[1]
                for line in lines
                if line.lower().startswith("sec-websocket-extensions:")
            ),
            "",
        )
        if "permessage-deflate" not in ext:
            raise Failed("permessage-deflate not negotiated")
        params = dict([*p.strip().split("="), ""][:2] for p in ext.split(";")[1:] if p.strip())
        self.server_reset = "server_no_context_takeover" in params
        client_bits = int(params.get("client_max_window_bits") or 15)
        server_bits = int(params.get("server_max_window_bits") or 15)
        return client_bits, "client_no_context_takeover" in params, server_bits

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            if start + n > end:
                break
            payload = bytes(buf[start : start + n])
            pos = start + n
            self._frame(b0, payload)
        del buf[:pos]

    def _frame(self, b0: int, payload: bytes) -> None:
        run = self.run
        opcode = b0 & 0x0F
        if opcode == OP_CLOSE:
            raise Failed(f"closed by the server: {payload[:2].hex()} {payload[2:]!r}")
        if opcode == OP_PING:  # the servers' keepalive: a run may outlast ping_interval
            assert self.transport is not None
            self.transport.write(client_frame(OP_PONG, payload, True, False))
            return
        if opcode > OP_CLOSE or run is None:
            return
        run.server_frames += 1
        run.server_bytes += len(payload)
        self.parts.append(payload)
        if not b0 & 0x80:
            return
        if self.server_reset:
            self.decoder = zlib.decompressobj(wbits=-15)
        message = self.decoder.decompress(b"".join(self.parts) + TAIL)
        self.parts.clear()
        if message != run.expected[run.index]:
            run.done.set_exception(Failed(f"message {run.index}: echo differs"))
            return
        run.index += 1
        if run.index == len(run.frames):
            run.done.set_result(None)
        else:
            assert self.transport is not None
            self.transport.write(run.frames[run.index])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.run is not None and not self.run.done.done():
            self.run.done.set_exception(ConnectionError(f"connection lost: {exc}"))


@dataclass
class DeflateResult:
    window: Window
    server_frames: int
    server_bytes: int
    client_bytes: int


async def deflate_echo(
    port: int,
    case: Case,
    messages: list[bytes],
    server_cpu: Callable[[], float],
    within: float = 300.0,
) -> DeflateResult:
    """Send ``messages`` one at a time, each echo checked, on one connection."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(lambda: DeflateClient(port), "127.0.0.1", port)
    try:
        bits, reset, _ = await asyncio.wait_for(client.opened, 10)
        frames = wire(case, messages, bits, reset)
        run = client.run = Run(messages, frames)
        t0, s0, c0 = time.perf_counter(), server_cpu(), client_cpu()
        transport.write(frames[0])
        await asyncio.wait_for(run.done, within)
        t1, s1, c1 = time.perf_counter(), server_cpu(), client_cpu()
    finally:
        transport.close()
    return DeflateResult(
        Window(t1 - t0, len(messages), s1 - s0, c1 - c0),
        run.server_frames,
        run.server_bytes,
        sum(map(len, frames)),
    )


# Standalone: wsechod against websockets' servers ------------------------------------------


class TreePeer(Peer):
    """wsechod from another source tree (``--tree before=DIR``, e.g. a ``git archive`` of
    main), with this environment's interpreter and packages."""

    def command(self, subscribers: int) -> list[str]:
        boot = (
            f"import sys; sys.path.insert(0, {self.argv[0]!r}); "
            "from wsechod.process.cli import main; sys.exit(main())"
        )
        return [sys.executable, "-c", boot, *wsechod_args("--compression", "deflate")[3:]]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} [{min(values):.3f}-{max(values):.3f}]"


async def standalone(args: argparse.Namespace) -> int:
    cases = [
        Case(args.messages, args.smallest, args.largest, fragment, split, payload)
        for payload in args.payloads
        for split in args.splits
        for fragment in args.fragments
    ]
    prepared = {case: make_messages(case) for case in cases}
    peers: list[Peer] = []
    for name in args.only:
        base = next(p for p in ECHO_PEERS if p.name == name)
        extra = ("--compression", "deflate") if name == "wsechod" else ()
        peers.append(Peer(base.name, base.label, "echo", (*base.argv, *extra)))
    for tree in args.tree:
        label, _, path = tree.partition("=")
        peers.append(TreePeer(label, label, "echo", (path,)))
    # seconds[case][peer], cpu_ms[case][peer]
    seconds: dict[Case, dict[str, list[float]]] = {c: {} for c in cases}
    cpu: dict[Case, dict[str, list[float]]] = {c: {} for c in cases}
    cores = sorted(os.sched_getaffinity(0))
    core = cores[0] if len(cores) > 1 else None
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    failures = 0
    for repeat in range(1, args.repeat + 1):
        for case in cases:
            order = peers if repeat % 2 else peers[::-1]  # interleaved, alternating order
            for peer in order:
                server = Server(peer, core)
                try:
                    r = await deflate_echo(server.port, case, prepared[case], server.cpu_seconds)
                except (Failed, OSError, TimeoutError, ConnectionError) as exc:
                    failures += 1
                    print(f"  FAILED {peer.label} {case.key}: {exc!r}", file=sys.stderr)
                    continue
                finally:
                    server.stop()
                w = r.window
                seconds[case].setdefault(peer.name, []).append(w.seconds)
                cpu[case].setdefault(peer.name, []).append(w.server_cpu / w.events * 1e3)
                print(
                    f"  {repeat} {case.key:<26} {peer.label:<12} {w.seconds:7.3f} s  server "
                    f"{w.server_cpu / w.events * 1e3:6.3f} ms/msg  client "
                    f"{100 * w.client_cpu / w.seconds:3.0f}%  echo {r.server_frames} frames "
                    f"{r.server_bytes / 1e6:.1f} MB (sent {r.client_bytes / 1e6:.1f} MB)",
                    file=sys.stderr,
                    flush=True,
                )
    base = args.only[-1] if args.only[0] == "wsechod" else args.only[0]
    print(
        f"\n{args.messages} messages of {args.smallest // 1024}-{args.largest // 1024} KiB, "
        f"one at a time; median [min-max] of {args.repeat}; ratio = median / {base}'s"
    )
    for case in cases:
        print(f"{case.key}")
        for peer in peers:
            s, c = seconds[case].get(peer.name), cpu[case].get(peer.name)
            if not s or not c:
                print(f"  {peer.label:<12} -")
                continue
            ref_s, ref_c = seconds[case].get(base), cpu[case].get(base)
            ratio = ""
            if ref_s and ref_c:
                ratio = (
                    f"  x{statistics.median(s) / statistics.median(ref_s):.2f} time"
                    f"  x{statistics.median(c) / statistics.median(ref_c):.2f} cpu"
                )
            print(f"  {peer.label:<12} {spread(s)} s  {spread(c)} ms/msg{ratio}")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.deflate", description=__doc__)
    add = parser.add_argument
    add("--messages", type=int, default=1000)
    add("--smallest", type=int, default=32 * 1024)
    add("--largest", type=int, default=128 * 1024)
    add("--fragments", default="256,32768", help="fragment sizes, comma-separated")
    add("--splits", default="data", help="data, wire or both: data,wire")
    add("--payloads", default="text,random", help="text, random or both")
    add("--repeat", type=int, default=3)
    add("--only", default="wsechod,example-asyncio", help="peers: wsechod,example-asyncio,example")
    add("--tree", action="append", default=[], help="LABEL=DIR: also wsechod from DIR")
    args = parser.parse_args(argv)
    args.fragments = [int(x) for x in args.fragments.split(",")]
    args.splits = args.splits.split(",")
    args.payloads = args.payloads.split(",")
    args.only = args.only.split(",")
    args.tree = [
        f"{label}={Path(path).resolve()}"
        for label, _, path in (t.partition("=") for t in args.tree)
    ]
    return args


def main() -> None:
    sys.exit(uvloop.run(standalone(parse_args())))


if __name__ == "__main__":
    main()
