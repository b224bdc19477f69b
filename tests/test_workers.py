"""Every core: ``workers = N`` processes on one port, supervised by the main process. Real
processes, real signals: a worker killed under load, a stop with clients on every worker,
the main process killed, the daemon's metrics and health from whichever worker answers."""

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import ClientConnection, connect, unix_connect

from tests import rawws
from tests.conftest import WSECHOD, Daemon, clean_env, peer_port, run_cli
from tests.redisd import RedisServer, free_port
from tests.test_daemon import gone, read_log, stat_fields
from tests.test_echo import http_get
from tests.test_metrics import scrape, scrape_when, value
from tests.test_systemd import (
    HARNESS_REASON,
    ROOT,
    NotifyListener,
    installed_units,
    ours,
    run_harness,
)
from tests.test_tls import issue, trusting
from wsechod import ratelimit
from wsechod.log import fields, get_logger
from wsechod.process.workers.restarts import BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET, backoff
from wsechod.process.workers.scoreboard import (
    LISTENING,
    PUBLISH_INTERVAL,
    RENDER_INTERVAL,
    Scoreboard,
)
from wsechod.process.workers.totals import Totals

WORKERS = 2


def start_workers(start: Callable[..., Daemon], *args: str, **kwargs: Any) -> Daemon:
    """wsechod with two workers, every connection logged; returns once all listen."""
    daemon = start("--workers", str(WORKERS), "--log-level", "debug", *args, **kwargs)
    daemon.wait_for("workers ready")
    return daemon


def of_worker(i: int) -> Callable[[dict[str, Any]], bool]:
    """Events logged by worker ``i``."""
    return lambda event: event.get("worker") == i


def in_log(log: Path, event: str, worker: int) -> bool:
    """The JSON log file has ``event`` from ``worker`` (the file may not be there yet)."""
    entries = read_log(log) if log.exists() else []
    return any(e["event"] == event and e.get("worker") == worker for e in entries)


def subscribed(worker: int, channel: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("worker") == worker and channel in e["channels"]


def pids(daemon: Daemon) -> list[int]:
    """The workers' pids when they were first all ready."""
    return list(daemon.wait_for("workers ready")["pids"])


def served_by(daemon: Daemon, port: int, after: str = "") -> int:
    """The worker that logged the connection from our local ``port`` (after a time)."""
    event = daemon.wait_for(
        "connection open", where=lambda e: peer_port(e) == port and e["timestamp"] > after
    )
    return int(event["worker"])


@pytest.fixture
def opened() -> Iterator[contextlib.ExitStack]:
    """Client connections opened during a test, closed at its end."""
    with contextlib.ExitStack() as stack:
        yield stack


def spread(
    daemon: Daemon, opened: contextlib.ExitStack, each: int = 2, path: str = "/"
) -> dict[int, list[ClientConnection]]:
    """Open connections until every worker has ``each`` (the kernel spreads them by
    address and port, SO_REUSEPORT); returns them by worker."""
    by: dict[int, list[ClientConnection]] = {i: [] for i in range(WORKERS)}
    for _ in range(60):
        if min(map(len, by.values())) >= each:
            return by
        ws = opened.enter_context(connect(f"{daemon.url}{path}"))
        by[served_by(daemon, ws.local_address[1])].append(ws)
    raise AssertionError(f"connections never reached every worker: {by}")


def raw_on_each(daemon: Daemon) -> list[socket.socket]:
    """One raw WebSocket client per worker, in the workers' order (they never answer a
    close frame)."""
    kept: dict[int, socket.socket] = {}
    extra = []
    for _ in range(60):
        if len(kept) == WORKERS:
            break
        sock = rawws.connect(daemon.port)
        worker = served_by(daemon, sock.getsockname()[1])
        if worker in kept:
            extra.append(sock)
        else:
            kept[worker] = sock
    for sock in extra:
        sock.close()
    assert len(kept) == WORKERS
    return [kept[i] for i in range(WORKERS)]


def alive(pid: int) -> bool:
    """Running (a zombie is not: it has exited)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


class Load:
    """Ping-pong on each connection from a thread of its own, until stopped."""

    def __init__(self, clients: list[ClientConnection]) -> None:
        self.counts = [0] * len(clients)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, ws)) for i, ws in enumerate(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int, ws: ClientConnection) -> None:
        try:
            while not self._stop.is_set():
                ws.send(f"m{self.counts[i]}")
                assert ws.recv(timeout=5) == f"m{self.counts[i]}"
                self.counts[i] += 1
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> list[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        return self.counts


def test_a_killed_worker_is_replaced_while_the_others_keep_serving(
    start: Callable[..., Daemon],
    opened: contextlib.ExitStack,
) -> None:
    daemon = start_workers(start)
    victim = pids(daemon)[0]
    by = spread(daemon, opened)
    load = Load(by[1])
    wait_until(lambda: min(load.counts) > 10, what="load on worker 1")

    os.kill(victim, signal.SIGKILL)
    for ws in by[0]:  # the victim's clients lose their connection, nothing else does
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    exited = daemon.wait_for("worker exited")
    assert (exited["level"], exited["worker"], exited["pid"]) == ("warning", 0, victim)
    assert exited["signal"] == "SIGKILL"
    assert exited["restart_in"] == BACKOFF_FIRST
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert alive(replaced["pid"]) and not alive(victim)
    during = list(load.counts)
    wait_until(lambda: all(a > b + 10 for a, b in zip(load.counts, during, strict=True)))
    load.stop()
    assert not load.errors, load.errors  # untouched, all along

    # The new process serves: connections reach worker 0 again, and echo.
    for _ in range(60):
        with connect(daemon.url) as ws:
            if served_by(daemon, ws.local_address[1], after=replaced["timestamp"]) == 0:
                ws.send("again")
                assert ws.recv(timeout=10) == "again"
                break
    else:
        raise AssertionError("no connection reached the new worker")
    wait_until(lambda: http_get(daemon.port, "/healthz")[:2] == (200, "ok\n"), what="ok")
    s = scrape_when(daemon.port, lambda s: value(s, "wsechod_worker_restarts_total") == 1)
    assert value(s, "wsechod_workers") == WORKERS
    for ws in by[1]:
        ws.close()


def test_sigterm_drains_every_worker_with_1001_and_exits_0(
    start: Callable[..., Daemon], tmp_path: Path, opened: contextlib.ExitStack
) -> None:
    pidfile = tmp_path / "wsechod.pid"
    daemon = start_workers(start, "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == daemon.proc.pid  # the main process's
    by = spread(daemon, opened, each=3)
    clients = [ws for group in by.values() for ws in group]

    daemon.signal(signal.SIGTERM)
    for ws in clients:
        with pytest.raises(ConnectionClosedOK) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1001
    assert daemon.wait(15) == 0
    assert not pidfile.exists()
    drained = [e for e in daemon.events if e["event"] == "drained"]
    assert sorted(e["worker"] for e in drained) == list(range(WORKERS))
    assert sum(e["connections"] for e in drained) == len(clients)
    assert sum(e["force_closed"] for e in drained) == 0
    assert not any(alive(pid) for pid in pids(daemon))
    assert daemon.events[-1]["event"] == "stopped"
    assert "worker" not in daemon.events[-1]  # the main process's, last


def test_workers_exit_when_the_main_process_is_killed(
    start: Callable[..., Daemon], opened: contextlib.ExitStack
) -> None:
    daemon = start_workers(start)
    workers = pids(daemon)
    by = spread(daemon, opened, each=1)

    killed = time.monotonic()
    os.kill(daemon.proc.pid, signal.SIGKILL)
    for group in by.values():  # they drain: 1001, as for any stop
        for ws in group:
            with pytest.raises(ConnectionClosedOK) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1001
    for pid in workers:
        assert gone(pid, 5), f"worker {pid} outlived the main process"
    took = time.monotonic() - killed
    print(f"workers gone {took:.2f} s after SIGKILL of the main process")
    assert took < 5
    assert not any(alive(pid) for pid in workers)  # /proc: exited (at most a zombie)


def test_metrics_and_health_answer_for_the_whole_daemon(
    start: Callable[..., Daemon], opened: contextlib.ExitStack
) -> None:
    daemon = start_workers(start, "--drain-timeout", "10", "--close-timeout", "60")
    by = spread(daemon, opened, each=3)
    clients = [ws for group in by.values() for ws in group]
    for ws in clients:
        ws.send("counted")
        assert ws.recv(timeout=10) == "counted"
    n = len(clients)
    # Published about once a second, so the first pages may be behind.
    scrape_when(
        daemon.port, lambda s: value(s, "wsechod_messages_received_total", type="text") == n
    )
    for _ in range(8):  # each scrape is a new connection: it may land on either worker
        s = scrape(daemon.port)
        assert value(s, "wsechod_connections_open") == n
        assert value(s, "wsechod_connections_opened_total") == n
        assert value(s, "wsechod_messages_received_total", type="text") == n
        assert value(s, "wsechod_workers") == WORKERS
        assert value(s, "process_cpu_seconds_total") > 0
        assert http_get(daemon.port, "/healthz")[:2] == (200, "ok\n")

    stubborn = raw_on_each(daemon)  # never answer the close: every worker stays draining
    daemon.signal(signal.SIGTERM)
    for i in range(WORKERS):
        daemon.wait_for("stop requested", where=of_worker(i))
    for _ in range(6):
        assert http_get(daemon.port, "/healthz")[0] == 503
    scrape_when(
        daemon.port,
        lambda s: (
            value(s, "wsechod_draining") == 1 and value(s, "wsechod_connections_open") == WORKERS
        ),  # the stubborn ones are left
    )
    for sock in stubborn:
        assert rawws.read_close(sock)[0] == 1001
        sock.close()
    assert daemon.wait(15) == 0


def test_sighup_reaches_every_worker(
    start: Callable[..., Daemon], tmp_path: Path, opened: contextlib.ExitStack
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text("max_size = 1000\n")
    daemon = start_workers(start, "--config", str(config))
    by = spread(daemon, opened, each=1)
    config.write_text("max_size = 2000\n")
    daemon.signal(signal.SIGHUP)
    for i in range(WORKERS):  # each worker applies it, and says so
        changed = daemon.wait_for("setting changed", where=of_worker(i))
        assert (changed["key"], changed["old"], changed["new"]) == ("max_size", 1000, 2000)
    for group in by.values():  # new connections on every worker get the new limit
        group[0].close()
    for ws in spread(daemon, opened, each=1).values():
        ws[0].send("x" * 1500)
        assert ws[0].recv(timeout=10) == "x" * 1500
        ws[0].close()
    daemon.signal(signal.SIGUSR1)  # the same for rules written for nginx
    for i in range(WORKERS):
        daemon.wait_for("settings reloaded: nothing changed", where=of_worker(i))
    assert daemon.proc.poll() is None


def test_a_reload_reads_the_settings_once_for_every_worker(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The main process reads the config file and hands the settings down: a bad file is
    one error, from the main process (a worker that read the file itself would say so
    too), and every worker applies the good one as the main process read it."""
    config = tmp_path / "wsechod.toml"
    config.write_text("max_size = 1000\n")
    daemon = start_workers(start, "--config", str(config))
    config.write_text("max_size = [\n")
    daemon.signal(signal.SIGHUP)
    error = daemon.wait_for("settings not reloaded: the old ones stay")
    assert "invalid TOML" in error["error"] and "worker" not in error
    config.write_text("max_size = 2000\n")
    daemon.signal(signal.SIGHUP)
    for i in range(WORKERS):  # both apply what the main process read, and say so
        changed = daemon.wait_for("setting changed", where=of_worker(i))
        assert (changed["key"], changed["old"], changed["new"]) == ("max_size", 1000, 2000)
    # Each worker has handled the first reload too by now: it said nothing of its own.
    assert [e["event"] for e in daemon.events].count(error["event"]) == 1


class CredentialListener(NotifyListener):
    """sd_notify's socket, recording which process sent each message (SCM_CREDENTIALS),
    as systemd does for NotifyAccess=main."""

    def __init__(self, address: str) -> None:
        self.senders: list[int] = []
        super().__init__(address)

    def _read(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except OSError:
                return
            pid = next(
                struct.unpack("iII", d)[0]
                for level, kind, d in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.senders.append(pid)
                self.messages.append((time.monotonic(), fields))
                self.wall.append((time.time(), fields))
                self._cond.notify_all()


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of detached daemons (and their workers) to kill if a test leaves them."""
    started: list[int] = []
    yield started
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_with_workers_is_ready_when_every_worker_listens(
    tmp_path: Path, daemons: list[int]
) -> None:
    notify = CredentialListener(str(tmp_path / "notify"))
    pidfile, log = tmp_path / "run" / "wsechod.pid", tmp_path / "wsechod.log"
    result = run_cli(
        "--config", "", "--port", "0", "--daemon", "--workers", str(WORKERS),
        "--pidfile", str(pidfile), "--log-file", str(log),
        env=clean_env(NOTIFY_SOCKET=notify.address),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    main = int(pidfile.read_text())
    daemons.append(main)
    # Ready means every worker listens: their lines are in the log when the command returns.
    listening = [e for e in read_log(log) if e["event"] == "listening"]
    daemons += [e["pid"] for e in listening]
    assert sorted(e["worker"] for e in listening) == list(range(WORKERS))
    ready = notify.wait_for("READY")
    assert len(ready) == 1
    assert ready[0]["MAINPID"] == str(main)
    assert ready[0]["STATUS"].endswith(f": 0 connections ({WORKERS} workers)")

    # SIGHUP to the main process: its log reopened, every worker's too, and each reloads.
    log.rename(tmp_path / "wsechod.log.1")
    os.kill(main, signal.SIGHUP)
    for i in range(WORKERS):
        wait_until(
            functools.partial(in_log, log, "settings reloaded: nothing changed", i),
            what=f"worker {i} reloaded, in the new file",
        )
    reopened = [e for e in read_log(log) if e["event"] == "log file reopened"]
    assert sorted(str(e.get("worker")) for e in reopened) == ["0", "1", "None"]
    notify.wait_for("READY", count=2)

    os.kill(main, signal.SIGTERM)
    notify.wait_for("STOPPING")
    notify.wait_for("EXTEND_TIMEOUT_USEC")  # the drain asks for its time, as one process does
    assert gone(main, 15)
    assert not pidfile.exists()
    assert not any(alive(pid) for pid in daemons)
    assert set(notify.senders) == {main}  # systemd hears from the main process only
    assert len(notify.wait_for("READY")) == 2  # once at start, once after the reload
    notify.close()


def test_a_wedged_worker_is_killed_and_replaced_under_the_watchdog(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    notify = NotifyListener(str(tmp_path / "notify"))
    env = clean_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000")
    daemon = start_workers(start, env=env)
    victim = pids(daemon)[0]
    os.kill(victim, signal.SIGSTOP)  # its loop stops: it publishes nothing any more
    stopped_at = time.monotonic()
    killed = daemon.wait_for("worker not responding: killed")
    assert (killed["level"], killed["pid"], killed["worker"]) == ("error", victim, 0)
    assert killed["silent_for"] >= 3
    daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    # The main process kept petting systemd's watchdog meanwhile.
    pings = [t for t in notify.times("WATCHDOG") if t > stopped_at]
    assert len(pings) >= 4
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    notify.close()


def test_a_crash_looping_worker_backs_off_and_its_warnings_are_rate_limited(
    start: Callable[..., Daemon],
) -> None:
    daemon = start_workers(start)
    pid = pids(daemon)[0]
    seen = {pid}
    for _ in range(4):
        os.kill(pid, signal.SIGKILL)
        pid = daemon.wait_for(
            "listening", where=lambda e: e["worker"] == 0 and e["pid"] not in seen
        )["pid"]
        seen.add(pid)

    def lines() -> list[dict[str, Any]]:
        return [e for e in daemon.events if e["event"] == "worker exited"]

    wait_until(lambda: sum(e["count"] for e in lines()) == 4, what="every exit counted")
    assert len(lines()) < 4  # one line per second at most
    assert lines()[0]["restart_in"] == BACKOFF_FIRST
    assert lines()[-1]["restart_in"] == 8 * BACKOFF_FIRST  # 0.1, 0.2, 0.4, 0.8


@pytest.mark.unit
def test_backoff_doubles_up_to_its_maximum_and_resets_after_a_long_life() -> None:
    delays, current = [], BACKOFF_FIRST
    for _ in range(10):
        delay, current = backoff(current, lived=0.5)
        delays.append(delay)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == BACKOFF_MAX
    assert backoff(current, lived=BACKOFF_RESET) == (BACKOFF_FIRST, 2 * BACKOFF_FIRST)


@pytest.mark.unit
def test_figures_that_do_not_parse_are_an_error_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker's figures that the main process cannot parse (only a bug of ours could
    write them) are left out of the page, or lost at its exit, and said so: an error with
    the traceback at once, then one line per interval with the count, from the main
    process's loop (it has no event loop to time it)."""
    caplog.set_level(logging.INFO, logger="wsechod")
    board = Scoreboard(1)
    warn = ratelimit.RateLimitedLog(get_logger("wsechod"), interval=0.05, polled=True)
    totals = Totals(board, os.getpid(), warn)
    board.write(board.slot_of(0, 1), b'{"counters": {}}', gen=1, pid=4242, state=LISTENING)

    def said() -> list[dict[str, Any]]:
        return [
            {**fields(r), "traceback": r.exc_info is not None}
            for r in caplog.records
            if r.getMessage() == "worker figures unreadable"
        ]

    for _ in range(3):
        totals.render()
    [first] = said()
    assert first == {
        "reason": "left out of the page",
        "worker": 0,
        "pid": 4242,
        "error": "KeyError: 'gauges'",
        "count": 1,
        "traceback": True,
    }
    assert caplog.records[-1].levelno == logging.ERROR
    due = warn.due()
    assert due is not None
    wait_until(lambda: time.monotonic() >= due)
    warn.flush_due()
    assert said()[1:] == [{**first, "count": 2, "traceback": False}]
    assert warn.due() is None

    board.write(board.slot_of(0, 1), b'{"gauges": {', gen=1, pid=4242, state=LISTENING)
    totals.retire(0, 1, 0.0)  # another reason: at once
    assert said()[2]["reason"] == "its counts are lost"
    assert said()[2]["error"].startswith("JSONDecodeError: ")


def test_unix_socket_is_shared_by_the_workers(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "ws.sock"
    daemon = start("--listen", f"unix:{path}", "--workers", str(WORKERS), "--log-level", "debug")
    daemon.wait_for("workers ready")
    for _ in range(10):
        with unix_connect(str(path)) as ws:
            ws.send("over unix")
            assert ws.recv(timeout=10) == "over unix"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert rawws.until_eof(sock).startswith(b"HTTP/1.1 200 ")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert not path.exists()  # removed by the main process, once every worker is done


def test_relay_across_workers_goes_through_redis(
    start: Callable[..., Daemon], redis_server: RedisServer, opened: contextlib.ExitStack
) -> None:
    daemon = start_workers(start, "--mode", "relay", "--broker", redis_server.url)
    by = spread(daemon, opened, each=1, path="/room")
    for i in range(WORKERS):  # pub/sub gives nobody what came before
        daemon.wait_for("broker subscriptions", where=subscribed(i, "/room"))
    p, q = by[0][0], by[1][0]
    for extra in [*by[0][1:], *by[1][1:]]:
        extra.close()
    p.send("from worker 0")
    assert q.recv(timeout=10) == "from worker 0"
    q.send("from worker 1")
    assert p.recv(timeout=10) == "from worker 1"
    p.close()
    q.close()


def test_a_port_in_use_is_refused_with_workers_too(start: Callable[..., Daemon]) -> None:
    daemon = start_workers(start)
    result = run_cli("--config", "", "--port", str(daemon.port), "--workers", str(WORKERS))
    assert result.returncode == 1
    assert result.stderr == (
        f"wsechod: error: cannot listen on 127.0.0.1:{daemon.port}: Address already in use\n"
    )


@pytest.mark.parametrize(
    ("args", "env", "toml", "expected"),
    [
        (["--workers", "0"], {}, None, "invalid workers '0' (from --workers): must be between 1"),
        (
            ["--workers", "many"],
            {},
            None,
            "invalid workers 'many' (from --workers): expected an integer (or auto)",
        ),
        ([], {"WSECHOD_WORKERS": "-2"}, None, "invalid workers '-2' (from WSECHOD_WORKERS)"),
        ([], {}, 'workers = "many"', "invalid workers 'many' (from "),
        (
            ["--mode", "relay", "--workers", "2"],
            {},
            None,
            "invalid workers 2 (from --workers): relay mode with several workers needs a "
            "broker they share",
        ),
    ],
)
def test_bad_workers_settings_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], toml: str | None, expected: str
) -> None:
    config = ""
    if toml is not None:
        (tmp_path / "w.toml").write_text(toml + "\n")
        config = str(tmp_path / "w.toml")
    result = run_cli("--config", config, *args, env=clean_env(**env))
    assert result.returncode == 2
    assert result.stderr.startswith(f"wsechod: error: {expected}"), result.stderr
    assert result.stderr.count("\n") == 1


def test_auto_is_the_cpus_this_process_may_use() -> None:
    result = run_cli("--config", "", "--workers", "auto", "--check-config")
    assert result.returncode == 0, result.stderr
    cpus = len(os.sched_getaffinity(0))
    assert f"\nworkers = {cpus}  # --workers (auto)\n" in result.stdout
    if shutil.which("taskset") is None:
        pytest.skip("no taskset to narrow the CPUs")
    narrowed = subprocess.run(
        ["taskset", "-c", str(min(os.sched_getaffinity(0))), WSECHOD, "--config", "",
         "--check-config"],
        env=clean_env(WSECHOD_WORKERS="auto"), capture_output=True, text=True, timeout=20,
        check=False,
    )  # fmt: skip
    assert "\nworkers = 1  # WSECHOD_WORKERS (auto)\n" in narrowed.stdout, narrowed.stderr


@pytest.mark.timeout(180)
def test_workers_under_a_real_systemd(tmp_path: Path) -> None:
    """The shipped hardened unit with workers = 2: READY=1 once both listen, /healthz and
    /metrics of the whole daemon through either worker, reload, stop with exit 0 (SIGTERM
    to the main process alone, KillMode=mixed, forwarded)."""
    if HARNESS_REASON is not None:
        pytest.skip(HARNESS_REASON)
    units = installed_units(tmp_path / "root")
    work = tmp_path / "unit"
    work.mkdir()
    work.chmod(0o755)  # the service runs as a DynamicUser
    port = free_port()
    (work / "wsechod.toml").write_text(f"port = {port}\nworkers = {WORKERS}\n")
    (work / "wsechod.toml").chmod(0o644)
    service = (
        units["wsechod.service"]
        .read_text()
        .replace(
            f"ExecStart={WSECHOD} --config /etc/wsechod/wsechod.toml",
            "Environment=PYTHONPATH=/srv/wsechod/src:/srv/wsechod/site\n"
            "ExecStart=/usr/bin/python3 -m wsechod --config /srv/wsechod/cfg/wsechod.toml",
        )
    )
    (work / "wsechod.service").write_text(service)
    env = clean_env(
        SYSD_BIND=f"{ROOT}:/srv/wsechod/src {sysconfig.get_paths()['purelib']}:/srv/wsechod/site "
        f"{work}:/srv/wsechod/cfg",
        SYSD_TIMEOUT="30",
        SYSD_PROBE=(
            f"{ours(port)}sleep 1.5; for i in 1 2 3 4; do "
            f"curl -s --max-time 10 http://127.0.0.1:{port}/healthz; "
            f"curl -s --max-time 10 http://127.0.0.1:{port}/metrics | grep -E "
            "'^(wsechod_workers|process_open_fds|wsechod_connections_open) '; done; "
            'echo "processes $(ours | wc -l)"'
        ),
    )
    result = run_harness([str(work / "wsechod.service")], env)
    print(result.stdout[-4000:])
    print(
        "\n".join(ln for ln in result.stdout.splitlines() if re.search(r"\| (ok|wsechod|proc)", ln))
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "status=0/SUCCESS" in result.stdout or "main process exited 0" in result.stdout
    assert result.stdout.count("| ok") == 4
    assert result.stdout.count(f"| wsechod_workers {WORKERS}.0") == 4
    assert f"| processes {WORKERS + 1}" in result.stdout


def test_a_restarted_worker_keeps_what_needs_a_restart(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A reload asking for another mode is refused by the running workers; a worker
    started after it must not take it either (it did: one port, two modes)."""
    config = tmp_path / "wsechod.toml"
    config.write_text("")
    daemon = start_workers(start, "--config", str(config))
    victim = pids(daemon)[0]
    # Relay with workers needs a shared broker: an unreachable one will do for this.
    config.write_text(f'mode = "relay"\nbroker = "redis://127.0.0.1:{free_port()}/0"\n')
    daemon.signal(signal.SIGHUP)
    for i in range(WORKERS):
        daemon.wait_for("setting needs a restart", where=of_worker(i))
    os.kill(victim, signal.SIGKILL)
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert replaced["mode"] == "echo"


def test_a_restarted_worker_does_not_turn_tls_on_that_a_reload_kept_off(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A reload adding a certificate is a restart's to apply (the listeners speak TLS or
    not from their start); a worker started after it must not speak TLS beside plain
    ones on the same port."""
    files = issue(tmp_path)
    config = tmp_path / "wsechod.toml"
    config.write_text("")
    daemon = start_workers(start, "--config", str(config))
    victim = pids(daemon)[0]
    config.write_text(f'tls_cert = "{files.cert}"\ntls_key = "{files.key}"\n')
    daemon.signal(signal.SIGHUP)
    for i in range(WORKERS):
        daemon.wait_for("setting needs a restart", where=of_worker(i))
    os.kill(victim, signal.SIGKILL)
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert replaced["tls"] == []


def test_workers_are_seen_even_if_sigchld_was_ignored(start: Callable[..., Daemon]) -> None:
    """A parent that ignores SIGCHLD passes that on: the kernel would reap the workers
    itself, and a dead one would never be replaced (nor a stop ever end)."""
    daemon = start_workers(start, prefix=("bash", "-c", "trap '' CHLD; exec \"$@\"", "bash"))
    victim = pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    daemon.wait_for("worker exited", where=lambda e: e["pid"] == victim)
    daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


def test_the_pidfile_is_free_as_soon_as_the_main_process_dies(
    start: Callable[..., Daemon], tmp_path: Path, opened: contextlib.ExitStack
) -> None:
    """Workers must not keep the pidfile's lock: after kill -9 of the main process the
    next start takes the pidfile over, even while the workers still drain."""
    pidfile = tmp_path / "wsechod.pid"
    daemon = start_workers(start, "--pidfile", str(pidfile), "--drain-timeout", "30",
                           "--close-timeout", "60")  # fmt: skip
    stubborn = raw_on_each(daemon)  # the workers drain for as long as these hold on
    os.kill(daemon.proc.pid, signal.SIGKILL)
    assert gone(daemon.proc.pid, 5)
    assert any(alive(pid) for pid in pids(daemon))  # still draining
    again = start("--pidfile", str(pidfile))
    assert again.wait_for("stale pidfile taken over")["pid"] == str(daemon.proc.pid)
    for sock in stubborn:
        sock.close()


def test_a_worker_started_again_serves_the_certificate_it_was_given(
    start: Callable[..., Daemon], opened: contextlib.ExitStack, tmp_path: Path
) -> None:
    """The TLS files are being replaced (a renewal half done, no SIGHUP yet) when a worker
    dies: its replacement serves with the main process's certificate, as the other one
    does, rather than fail on the files and crash-loop."""
    files = issue(tmp_path)
    daemon = start_workers(start, "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    victim = pids(daemon)[0]
    files.key.rename(tmp_path / "key.new")
    os.kill(victim, signal.SIGKILL)
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    for _ in range(60):
        ws = opened.enter_context(
            connect(f"wss://127.0.0.1:{daemon.port}/", ssl=trusting(files.ca), open_timeout=5)
        )
        if served_by(daemon, ws.local_address[1], after=replaced["timestamp"]) == 0:
            ws.send("renewing")
            assert ws.recv(timeout=5) == "renewing"
            break
    else:
        raise AssertionError("no connection reached the replaced worker")
    assert not [e for e in daemon.events if e["event"] == "worker failed"]


def test_a_reload_reaches_a_worker_that_was_starting(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A SIGHUP that comes while a worker is starting (here held for seconds by a broker
    that accepts and never answers) is applied once it listens, not dropped: it was forked
    with the settings of before."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        config = tmp_path / "wsechod.toml"
        config.write_text(
            f'mode = "relay"\nbroker = "redis://127.0.0.1:{mute.getsockname()[1]}/0"\n'
        )
        daemon = start_workers(start, "--config", str(config))
        mine = pids(daemon)
        victim = mine[0]
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for("starting", where=lambda e: e.get("worker") == 0 and e["pid"] != victim)
        config.write_text(config.read_text() + "max_size = 4096\n")
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_for("setting changed", where=of_worker(1))["key"] == "max_size"
        # Still starting (the broker holds it for seconds): the reload waits for it.
        events = daemon.events
        assert not [e for e in events if e["event"] == "listening" and e["pid"] not in mine]
        changed = daemon.wait_for("setting changed", where=of_worker(0))
        assert (changed["key"], changed["new"]) == ("max_size", 4096)
        replaced = daemon.wait_for(
            "listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim
        )
        assert changed["timestamp"] >= replaced["timestamp"]
        # And it holds: the replacement closes a message over the new limit with 1009.
        for _ in range(60):
            with connect(f"{daemon.url}/room") as ws:
                if served_by(daemon, ws.local_address[1], after=replaced["timestamp"]) == 0:
                    ws.send("x" * 5000)
                    with pytest.raises(ConnectionClosed) as closed:
                        ws.recv(timeout=5)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
                    break
        else:
            raise AssertionError("no connection reached the replaced worker")


def test_a_worker_told_to_stop_alone_is_replaced_at_once_while_it_drains(
    start: Callable[..., Daemon], opened: contextlib.ExitStack
) -> None:
    """SIGTERM to one worker (recycling it): it drains its clients (1001) but takes no
    newcomer and says nothing of the daemon draining; another worker is started on its
    sockets at once, so nobody gets 503 meanwhile; what the first counted is kept."""
    daemon = start_workers(start, "--drain-timeout", "60", "--close-timeout", "60")
    victim = pids(daemon)[0]
    mine = raw_on_each(daemon)[0]  # on worker 0; never answers the close frame
    for i in range(5):
        rawws.send_frame(mine, 0x1, b"m%d" % i)
        assert rawws.read_frame(mine) == (0x1, b"m%d" % i)
    before = scrape_when(
        daemon.port, lambda s: value(s, "wsechod_messages_received_total", type="text") >= 5
    )
    received = value(before, "wsechod_messages_received_total", type="text")

    os.kill(victim, signal.SIGTERM)
    # From the signal on, every health check is answered 200: "ok", or for the moment
    # the other one is starting, "degraded: 1 of 2 workers not running"; then "ok".
    answers: list[tuple[int, str]] = []
    while answers[-20:] != [(200, "ok\n")] * 20:
        answers.append(http_get(daemon.port, "/healthz")[:2])
        assert len(answers) < 500, answers
    assert {status for status, _ in answers} == {200}, answers
    assert rawws.read_close(mine)[0] == 1001
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert alive(victim)  # still draining its client
    by = spread(daemon, opened, each=1)  # upgrades reach both workers, the new one included
    assert served_by(daemon, by[0][0].local_address[1], after=replaced["timestamp"]) == 0
    s = scrape_when(daemon.port, lambda s: value(s, "wsechod_workers") == WORKERS)
    assert value(s, "wsechod_draining") == 0

    mine.close()  # its last client gone, the first worker's drain ends
    drained = daemon.wait_for("worker drained")
    assert drained["pid"] == victim and not alive(victim)
    assert not [e for e in daemon.events if e["event"] == "worker exited"]
    after = scrape_when(
        daemon.port,
        lambda s: (
            sum(
                v
                for (n, labels), v in s.items()
                if n == "wsechod_closes_total" and ("code_sent", "1001") in labels
            )
            >= 1
        ),
    )
    assert value(after, "wsechod_messages_received_total", type="text") >= received
    assert value(after, "wsechod_worker_restarts_total") == 1


def on_worker(daemon: Daemon, worker: int, after: str) -> socket.socket:
    """A raw WebSocket client served by ``worker`` (one started after ``after``)."""
    for _ in range(60):
        sock = rawws.connect(daemon.port)
        if served_by(daemon, sock.getsockname()[1], after=after) == worker:
            return sock
        sock.close()
    raise AssertionError(f"no connection reached worker {worker}")


def recycle_twice(
    start: Callable[..., Daemon], *args: str
) -> tuple[Daemon, int, socket.socket, dict[str, Any], socket.socket]:
    """Worker 0 recycled (it drains a client that never answers the close, ``first``),
    then its replacement (``second``, draining ``held``): the daemon, the first pid, ..."""
    daemon = start_workers(start, "--drain-timeout", "60", "--close-timeout", "60", *args)
    victim = pids(daemon)[0]
    first = raw_on_each(daemon)[0]
    os.kill(victim, signal.SIGTERM)
    assert rawws.read_close(first)[0] == 1001
    second = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    held = on_worker(daemon, 0, second["timestamp"])
    os.kill(second["pid"], signal.SIGTERM)
    assert rawws.read_close(held)[0] == 1001  # it has said it drains
    return daemon, victim, first, second, held


def test_a_worker_recycled_while_the_one_it_replaced_drains_comes_back_once_drained(
    start: Callable[..., Daemon],
) -> None:
    """Two recycles of one worker in a row: the second cannot leave alone (the first still
    drains in the board's other slot), so it drains as any process does; once it has, it
    is started again at once, as a recycle, not a crash."""
    daemon, victim, first, second, held = recycle_twice(start)
    held.close()
    drained = daemon.wait_for("worker drained")
    assert drained["pid"] == second["pid"]
    third = daemon.wait_for(
        "listening", where=lambda e: e["worker"] == 0 and e["pid"] not in (victim, second["pid"])
    )
    assert alive(victim) and alive(third["pid"])
    first.close()
    daemon.wait_for("worker drained", where=lambda e: e["pid"] == victim)
    assert not [e for e in daemon.events if e["event"] == "worker exited"]
    scrape_when(  # the third counts as running once its doorbell is answered
        daemon.port,
        lambda s: (
            (value(s, "wsechod_worker_restarts_total"), value(s, "wsechod_workers")) == (2, WORKERS)
        ),
    )
    wait_until(lambda: http_get(daemon.port, "/healthz")[:2] == (200, "ok\n"), what="ok")


def test_a_recycled_worker_gone_before_the_main_process_looked_is_no_crash(
    start: Callable[..., Daemon],
) -> None:
    """An idle worker drains in a moment: with the main process held (SIGSTOP) until the
    worker has exited, its doorbell and its exit come together. Either way: a recycle."""
    daemon = start_workers(start)
    victim = pids(daemon)[0]
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGTERM)
        wait_until(lambda: not alive(victim), what="the worker exited")
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert daemon.wait_for("worker drained")["pid"] == victim
    daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert not [e for e in daemon.events if e["event"] == "worker exited"]


def test_workers_whose_main_process_died_answer_503_while_they_drain(
    start: Callable[..., Daemon],
) -> None:
    """The main process killed: each worker drains, as in any stop, and keeps its socket
    open meanwhile, so newcomers get 503 (not a refused connection)."""
    daemon = start_workers(start, "--drain-timeout", "60", "--close-timeout", "60")
    workers = pids(daemon)
    held = raw_on_each(daemon)
    daemon.proc.kill()
    for sock in held:
        assert rawws.read_close(sock)[0] == 1001
    for _ in range(10):
        assert http_get(daemon.port, "/healthz")[:2] == (503, "draining\n")
    for sock in held:
        sock.close()
    wait_until(lambda: not any(alive(pid) for pid in workers), what="the workers exited")


def test_systemd_hears_ready_once_every_worker_listens_even_after_an_early_sighup(
    tmp_path: Path,
) -> None:
    """A SIGHUP while the workers start (a broker holds them): no RELOADING=1 or READY=1
    before the start's READY=1, and each worker reloads once it listens."""
    notify = NotifyListener(str(tmp_path / "notify"))
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        broker = f"redis://127.0.0.1:{mute.getsockname()[1]}/0"
        env = clean_env(NOTIFY_SOCKET=notify.address)
        daemon = Daemon("--workers", str(WORKERS), "--mode", "relay", "--broker", broker, env=env)
        try:
            daemon.wait_for("starting", where=lambda e: "workers" in e)  # the main process's
            daemon.signal(signal.SIGHUP)
            daemon.wait_for("workers ready")
            for i in range(WORKERS):
                daemon.wait_for("settings reloaded: nothing changed", where=of_worker(i))
            first = notify.wait_for("READY")[0]
            assert first["STATUS"].endswith(f"({WORKERS} workers)"), first
            before = [m for _, m in notify.messages][: [m for _, m in notify.messages].index(first)]
            assert not [m for m in before if "RELOADING" in m or "READY" in m], before
        finally:
            daemon.kill()
            notify.close()


def test_recycling_a_relay_worker_leaves_the_daemon_healthy(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """The recycled worker closes its broker while it drains: that is not the daemon's
    trouble. /healthz stays ok and wsechod_broker_connected 1 all along."""
    daemon = start_workers(
        start, "--mode", "relay", "--broker", redis_server.url,
        "--drain-timeout", "60", "--close-timeout", "60",
    )  # fmt: skip
    victim = pids(daemon)[0]
    held = raw_on_each(daemon)[0]
    wait_until(lambda: http_get(daemon.port, "/healthz")[:2] == (200, "ok\n"), what="ok")
    os.kill(victim, signal.SIGTERM)
    assert rawws.read_close(held)[0] == 1001
    daemon.wait_for("broker closed", where=lambda e: e.get("worker") == 0)
    replaced = daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    # The new one counts as running once its doorbell is answered (a moment after it
    # logs listening): from then on, sampled over more than one publication of each
    # worker and one render after it
    # (the recycled worker's figures now say its broker is closed): never degraded.
    wait_until(lambda: http_get(daemon.port, "/healthz")[:2] == (200, "ok\n"), what="ok")
    deadline = time.monotonic() + PUBLISH_INTERVAL + 2 * RENDER_INTERVAL + 0.5
    while time.monotonic() < deadline:
        assert http_get(daemon.port, "/healthz")[:2] == (200, "ok\n")
        assert value(scrape(daemon.port), "wsechod_broker_connected") == 1
    assert alive(victim) and replaced["pid"] != victim
    held.close()
    daemon.wait_for("worker drained", where=lambda e: e["pid"] == victim)


def test_the_daemons_stop_does_not_cut_a_worker_already_draining(
    start: Callable[..., Daemon],
) -> None:
    """Workers already draining (one recycled alone, one recycled while the first still
    drains) do not take the daemon's stop for a second one, which would cut their drain."""
    daemon, _, first, _, held = recycle_twice(start)
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stop requested", where=lambda e: "workers" in e)  # the main process's
    for sock in (first, held):
        sock.close()
    assert daemon.wait(15) == 0
    assert not [e for e in daemon.events if e["event"] == "stopping now"]


def test_a_relay_worker_draining_without_a_replacement_says_the_daemon_is_ok(
    start: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """The second of two recycles in a row drains as any process does, still answering on
    its socket: its closed broker is not the daemon's trouble there either."""
    daemon, _, first, _, held = recycle_twice(
        start, "--mode", "relay", "--broker", redis_server.url
    )
    wait_until(
        lambda: (
            sum(e["event"] == "broker closed" and e.get("worker") == 0 for e in daemon.events) == 2
        ),
        what="both recycled workers closed their broker",
    )
    assert {http_get(daemon.port, "/healthz")[:2] for _ in range(20)} == {(200, "ok\n")}
    for sock in (first, held):
        sock.close()


def test_the_main_process_survives_being_stopped_and_continued(
    start: Callable[..., Daemon],
) -> None:
    """SIGSTOP, then SIGCONT after its timer's deadline (a debugger, a frozen container):
    it goes on supervising."""
    daemon = start_workers(start)
    main = daemon.proc.pid
    for _ in range(3):
        os.kill(main, signal.SIGSTOP)
        wait_until(lambda: stat_fields(main)[0] == "T", what="stopped")
        time.sleep(RENDER_INTERVAL + 0.2)  # the stimulus: stopped past its timer's deadline
        os.kill(main, signal.SIGCONT)
    victim = pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)  # and it still replaces a worker
    daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert daemon.proc.poll() is None
    assert not [e for e in daemon.events if e["event"] == "crashed"]
