"""``python -m bench.backoff [KILLS]``: newcomers while a worker waits for its restart.

wsechod with ``workers = 2``; worker 0 is killed (SIGKILL) as soon as each replacement
listens, KILLS times (default 7: its restart then waits 6.4 s, the backoff doubling from
0.1 s). Right after the last exit is reaped, 200 clients (3 s timeout each: open, echo one
message, close) and 6 health checks (one every 0.3 s) arrive. Prints how many were
answered, how long after each kill the main process steered new connections away from the
dead worker (its ``new connections steered`` log line against the kill's clock), and when
the replacement listened. Without steering, the kernel kept giving the dead worker's
socket half of the newcomers, who waited there until they timed out. ``$WSECHOD`` runs
another wsechod command, e.g. an older checkout's: ``WSECHOD="env -C /tmp
PYTHONPATH=/path/to/checkout .venv/bin/python -m wsechod"``.
"""

import asyncio
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

# $WSECHOD: another command to measure (e.g. an older checkout's), split like a shell's.
WSECHOD = shlex.split(os.environ.get("WSECHOD", str(Path(sys.executable).with_name("wsechod"))))
CLIENTS, CHECKS, TIMEOUT, CHECK_EVERY = 200, 6, 3.0, 0.3


class Log:
    """The daemon's JSON lines, read on a thread."""

    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait(self, where: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: any(map(where, self.events)), timeout):
                raise SystemExit("the daemon did not say what was expected in time")
            return next(e for e in self.events if where(e))

    def steers(self) -> bool:
        """Whether this wsechod steers new connections (an older one does not)."""
        return any(e["event"] == "new connections steered" for e in self.events)


def _all_again(event: dict[str, Any], after: str = "") -> bool:
    """Steered to both workers (after a time)."""
    steered = event["event"] == "new connections steered" and event["workers"] == [0, 1]
    return bool(steered and event["timestamp"] >= after)


async def echo(url: str, i: int) -> bool:
    try:
        async with asyncio.timeout(TIMEOUT):
            async with connect(url, open_timeout=None) as ws:
                await ws.send(f"m{i}")
                return await ws.recv() == f"m{i}"
    except (OSError, TimeoutError, Exception):
        return False


async def health(port: int, i: int) -> str | None:
    await asyncio.sleep(i * CHECK_EVERY)
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return answer.split(b"\r\n", 1)[0].decode()


async def newcomers(port: int) -> tuple[list[bool], list[str | None]]:
    url = f"ws://127.0.0.1:{port}/"
    return await asyncio.gather(
        asyncio.gather(*(echo(url, i) for i in range(CLIENTS))),
        asyncio.gather(*(health(port, i) for i in range(CHECKS))),
    )


def main() -> None:
    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    proc = subprocess.Popen(
        [*WSECHOD, "--config", "", "--port", "0", "--workers", "2", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Log(proc)
    try:
        ready = log.wait(lambda e: e["event"] == "workers ready")
        port = int(ready["addresses"][0].rsplit(":", 1)[1])
        pid, seen, killed = ready["pids"][0], {ready["pids"][0]}, []
        time.sleep(0.5)  # a start with workers steers once or twice, if it steers at all
        if log.steers():
            log.wait(_all_again)  # the main process has seen both listen
        for k in range(kills):
            killed.append(time.time())
            os.kill(pid, signal.SIGKILL)
            if k < kills - 1:
                listening = log.wait(
                    lambda e: (
                        e["event"] == "listening" and e["worker"] == 0 and e["pid"] not in seen
                    )
                )
                pid = listening["pid"]
                seen.add(pid)
                # Once the main process has seen it listen and steers to it again: each
                # kill's steering is then measured from the kill.
                if log.steers():
                    log.wait(functools.partial(_all_again, after=listening["timestamp"]))
        while os.path.exists(f"/proc/{pid}"):  # until the main process has reaped it
            time.sleep(0.001)
        started = time.time()
        answered, checks = asyncio.run(newcomers(port))
        done = time.time()
        back = log.wait(
            lambda e: e["event"] == "listening" and e["worker"] == 0 and e["pid"] not in seen, 15
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"{kills} kills; the newcomers came {started - killed[-1]:.3f} s after the last")
    print(f"clients answered: {sum(answered)} of {CLIENTS} ({TIMEOUT:g} s timeout)")
    print(f"health checks answered: {sum(c is not None for c in checks)} of {CHECKS}: {checks}")
    steered = [
        datetime.fromisoformat(e["timestamp"]).timestamp()
        for e in log.events
        if e["event"] == "new connections steered" and e["workers"] == [1]
    ]
    after = [1000 * (min(s for s in steered if s >= k) - k) for k in killed if steered]
    if after:
        print("steered away after each kill (ms): " + ", ".join(f"{ms:.1f}" for ms in after))
    else:
        print("no steering")
    listened = datetime.fromisoformat(back["timestamp"]).timestamp() - killed[-1]
    print(
        f"the replacement listened {listened:.2f} s after the last kill; the newcomers were "
        f"done {done - killed[-1]:.2f} s after it"
    )


if __name__ == "__main__":
    main()
