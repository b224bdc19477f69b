"""A dead worker's share of new connections: steered to the workers that accept
(``wsechod.process.workers.steering``), from the program's own logic to the real daemon with a
worker held in its restart backoff."""

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.client import connect as aconnect
from websockets.sync.client import connect

from tests.conftest import Daemon
from tests.test_workers import pids, served_by, start_workers
from wsechod.process.workers import steering
from wsechod.process.workers.restarts import BACKOFF_FIRST
from wsechod.process.workers.steering import Instruction, program
from wsechod.settings import MAX_WORKERS


def run(instructions: list[Instruction], random: int) -> int:
    """The program, as the kernel would run it, with SKF_AD_RANDOM giving ``random``."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == steering.LD_W_ABS:
            assert k == steering.SKF_AD_RANDOM
            a = random
        elif code == steering.ALU_MOD_K:
            assert k > 0
            a %= k
        elif code == steering.JMP_JEQ_K:
            pc += jt if a == k else jf
        elif code == steering.RET_K:
            return k
        elif code == steering.RET_A:
            return a
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("live", "size", "expected"),
    [
        ([1], 2, [1]),
        ([0, 2], 3, [0, 2]),
        ([3, 1, 1], 4, [1, 3]),  # any order, repeats
        ([], 3, [0, 1, 2]),  # nobody accepts: wait anywhere
        ([0, 1, 2], 3, [0, 1, 2]),
        ([5], 8, [5]),
    ],
)
def test_the_program_picks_evenly_among_the_live_sockets_only(
    live: list[int], size: int, expected: list[int]
) -> None:
    instructions = program(live, size)
    assert len(instructions) <= steering.MAX_INSTRUCTIONS
    # A whole cycle of residues, from anywhere in the u32 range: each live socket as often.
    for base in (0, 2**32 - 1000 * len(expected)):
        picked = [run(instructions, base + r) for r in range(100 * len(expected))]
        assert {i: picked.count(i) for i in set(picked)} == {i: 100 for i in expected}


@pytest.mark.unit
def test_the_program_fits_the_most_workers() -> None:
    every_other = list(range(0, MAX_WORKERS, 2))
    instructions = program(every_other, MAX_WORKERS)
    assert len(instructions) <= steering.MAX_INSTRUCTIONS
    assert {run(instructions, r) for r in range(len(every_other))} == set(every_other)
    with pytest.raises(ValueError, match="out of a group of 2"):
        program([2], 2)


@pytest.mark.unit
def test_the_kernel_steers_each_group_as_told() -> None:
    """Real reuseport groups (IPv4 and, where there is one, IPv6), real connections."""
    groups = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        group: list[socket.socket] = []
        port = 0
        with contextlib.suppress(OSError):  # no IPv6 here
            for _ in range(3):
                sock = socket.socket(family)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                sock.listen(512)
                sock.setblocking(False)
                port = sock.getsockname()[1]
                group.append(sock)
            groups.append(group)
    ways = steering.Steering(groups, 3)
    assert not ways.update([0, 1, 2])  # as the kernel has it already: nothing to do
    assert ways.update([0, 2])
    assert not ways.update([2, 0])
    clients = []
    try:
        for group in groups:
            address = group[0].getsockname()[:2]
            clients += [socket.create_connection(address, timeout=10) for _ in range(60)]
            accepted = [_accept_all(sock) for sock in group]
            assert accepted[1] == 0 and accepted[0] > 0 and accepted[2] > 0, accepted
        assert ways.update([])  # nobody: anyone
        for group in groups:
            address = group[0].getsockname()[:2]
            clients += [socket.create_connection(address, timeout=10) for _ in range(90)]
            assert all(_accept_all(sock) > 0 for sock in group)
    finally:
        for sock in [*clients, *(s for g in groups for s in g)]:
            sock.close()


def _accept_all(sock: socket.socket) -> int:
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.accept()[0].close()
            count += 1
    return count


CLIENTS, CHECKS, TIMEOUT = 100, 6, 1.5


def steered_to(workers: list[int], after: str) -> Callable[[dict[str, Any]], bool]:
    """The main process's ``new connections steered`` to ``workers``, logged after a time."""
    return lambda e: e["workers"] == workers and e["timestamp"] >= after


async def _echo(url: str, i: int) -> str | None:
    """None if echoed within TIMEOUT, else what went wrong."""
    try:
        async with asyncio.timeout(TIMEOUT):
            async with aconnect(url, open_timeout=None) as ws:
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
    except (Exception, TimeoutError) as exc:
        return repr(exc)
    return None


async def _health(port: int) -> str | None:
    """The status line of /healthz, or None if it did not come within TIMEOUT."""
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return answer.split(b"\r\n", 1)[0].decode()


async def _during(url: str, port: int) -> tuple[list[str | None], list[str | None]]:
    return await asyncio.gather(
        asyncio.gather(*(_echo(url, i) for i in range(CLIENTS))),
        asyncio.gather(*(_health(port) for _ in range(CHECKS))),
    )


def test_a_dead_workers_share_goes_to_the_live_ones_during_its_backoff(
    start: Callable[..., Daemon],
) -> None:
    """Worker 0 killed as soon as each replacement listens, until its restart waits
    3.2 s: meanwhile every newcomer, echo and /healthz alike, is answered (before, half of
    them waited in the dead worker's backlog until they timed out), and once the
    replacement listens it gets its share again."""
    daemon = start_workers(start)
    victim = pids(daemon)[0]
    seen = {victim}
    backoff = BACKOFF_FIRST
    while True:
        killed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as the log has it
        os.kill(victim, signal.SIGKILL)
        if backoff >= 3.2:
            break
        last = daemon.wait_for(
            "listening", where=lambda e: e["worker"] == 0 and e["pid"] not in seen
        )
        victim = last["pid"]
        seen.add(victim)
        backoff *= 2
        # Killed once the main process has seen it listen and steers to it again.
        daemon.wait_for("new connections steered", where=steered_to([0, 1], last["timestamp"]))
    steered = daemon.wait_for("new connections steered", where=steered_to([1], killed))
    checks: list[str | None]
    failures, checks = asyncio.run(_during(daemon.url, daemon.port))
    assert [f for f in failures if f is not None] == []
    assert checks == ["HTTP/1.1 200 OK"] * CHECKS  # 200 degraded: 1 of 2 workers not running
    back = daemon.wait_for(
        "listening", timeout=15, where=lambda e: e["worker"] == 0 and e["pid"] not in seen
    )
    # Most of it happened while worker 0 waited for its restart (on a loaded machine the
    # clients may outlast the backoff: those served after it prove nothing, and fail none).
    during = [
        e
        for e in daemon.events
        if e["event"] == "connection open"
        and steered["timestamp"] < e["timestamp"] < back["timestamp"]
    ]
    assert len(during) >= CLIENTS // 2, (steered, back, len(during))
    daemon.wait_for("new connections steered", where=steered_to([0, 1], back["timestamp"]))
    deadline = time.monotonic() + 20
    while True:  # and the replacement gets newcomers again
        with connect(daemon.url) as ws:
            if served_by(daemon, ws.local_address[1], after=back["timestamp"]) == 0:
                break
        assert time.monotonic() < deadline, "no connection reached the replacement"
