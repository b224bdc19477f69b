"""``python -m bench.hotpath [REV]``: nanoseconds per echoed message in the engine's hot
path (``WebSocket.data_received``: parse, check, echo to a transport that only counts, and
the end of the turn's flush),
this tree's ``connection.py`` against the one of git revision REV (default HEAD),
interleaved, the best of many repeats.

The end-to-end benchmark cannot see a few nanoseconds among the 8 µs or so that a round
trip costs the server, most of it in the kernel, least of all on a shared machine; this
can, because both versions run in the same process, one after the other, many times.
"""

import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from websockets.speedups import apply_mask

from wsechod.apps.echo import Echo
from wsechod.engine import Options

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "wsechod/engine/connection.py"
FRAMES, ROUNDS = 200, 50  # frames per read, reads per timing


class Transport:
    """Takes the echoes and forgets them."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Engine:
    """What a connection asks of its engine, without one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.app = Echo()
        self.options = Options(ping_interval=0)
        self.corked: list[Any] = []

    def uncork(self) -> None:
        corked, self.corked = self.corked, []
        for ws in corked:
            ws.flush()

    def closed(self, ws: object) -> None:
        pass


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frames(opcode: int, size: int) -> bytes:
    out = bytearray()
    for _ in range(FRAMES):
        mask = os.urandom(4)
        out += bytes([0x80 | opcode, 0x80 | size]) + mask + apply_mask(b"x" * size, mask)
    return bytes(out)


async def measure(versions: dict[str, ModuleType], repeats: int) -> dict[tuple[str, str], float]:
    loop = asyncio.get_running_loop()
    reads = {"text": frames(0x1, 32), "binary": frames(0x2, 32)}
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeats):
        for name, module in versions.items():
            for kind, data in reads.items():
                engine = Engine(loop)
                ws = module.WebSocket(engine, Transport(), "/", "bench", None)
                began = time.perf_counter_ns()
                for _ in range(ROUNDS):
                    ws._budget = 1 << 30  # one turn of the loop for the whole timing
                    ws.data_received(data)
                    engine.uncork()  # the end of the turn: corked writes go out
                took = (time.perf_counter_ns() - began) / (ROUNDS * FRAMES)
                best[name, kind] = min(best.get((name, kind), took), took)
    return best


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    old = subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "old.py").write_text(old)
        versions = {rev: load("old", Path(tmp) / "old.py"), "tree": load("new", ROOT / SOURCE)}
        best = asyncio.run(measure(versions, repeats))
    print(f"ns per echoed 32-byte message, best of {repeats}: {rev} vs this tree")
    for kind in ("text", "binary"):
        before, after = best[rev, kind], best["tree", kind]
        change = (after - before) / before
        print(f"  {kind:<6} {before:7.1f} {after:7.1f}  {after - before:+6.1f} ns ({change:+.1%})")


if __name__ == "__main__":
    main()
