"""The command's first milliseconds: the signals it handles are blocked from its entry point
on, before the package is imported, so that one sent while it starts stops or reloads it as
one sent later does, instead of ending it with the signal's default action (no log line,
an exit status systemd calls a failure).

Each process is signalled as soon as /proc says the signals are blocked, which is the
moment the window used to be open (it lasted the import of the whole command, 150-200 ms).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WSECHOD, Daemon, clean_env
from tests.test_daemon import gone
from wsechod.process import entry, runner

EARLY = frozenset(entry.EARLY_SIGNALS)
# The command, as the console script and as a module.
COMMANDS = {"console script": [WSECHOD], "python -m": [sys.executable, "-m", "wsechod"]}
# An interpreter that only blocks them: what the entry point is measured against.
NUMBERS = ", ".join(str(int(s)) for s in sorted(EARLY))
BARE = (
    f"import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {{{NUMBERS}}}); time.sleep(60)"
)
BUDGET = 0.020  # seconds the command may take beyond the bare interpreter to block them
MIN_ROUNDS, MAX_ROUNDS = 10, 60


def of_worker(i: int) -> Callable[[dict[str, Any]], bool]:
    """Events logged by worker ``i``."""
    return lambda event: event.get("worker") == i


def signal_set(pid: int, field: str) -> set[int] | None:
    """The signals in /proc/PID/status's ``field`` (SigBlk, SigCgt, ...); None once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            bits = int(line.split()[1], 16)
            return {n for n in range(1, 65) if bits >> (n - 1) & 1}
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def blocked_now(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` blocks every signal the command handles: True then. False if its
    handlers were installed and the signals unblocked before this saw them blocked (this
    poller was not scheduled meanwhile), or if it never blocked them at all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blocked, caught = signal_set(pid, "SigBlk"), signal_set(pid, "SigCgt")
        if blocked is None or caught is None:
            raise AssertionError(f"process {pid} exited before it blocked the signals")
        if EARLY.issubset(blocked):
            return True
        if EARLY.issubset(caught):
            return False
        time.sleep(0.0002)  # a pause, so that the poller leaves the process a core
    raise AssertionError(f"process {pid} neither blocked nor caught the signals in {timeout} s")


def started_blocked(launch: Callable[[], Any], pid: Callable[[Any], int], kill: Any) -> Any:
    """``launch()`` until this sees its process with the signals blocked (three tries: this
    poller may be descheduled for the whole window on a loaded machine)."""
    for _ in range(3):
        launched = launch()
        if blocked_now(pid(launched)):
            return launched
        kill(launched)
    raise AssertionError("the signals were never seen blocked before the handlers took them")


@pytest.fixture
def early() -> Iterator[Callable[..., Daemon]]:
    """A wsechod in the foreground, returned as soon as it has blocked the signals."""
    started: list[Daemon] = []

    def _early(*args: str) -> Daemon:
        def launch() -> Daemon:
            started.append(Daemon(*args))
            return started[-1]

        daemon: Daemon = started_blocked(launch, lambda d: d.proc.pid, Daemon.kill)
        return daemon

    yield _early
    for daemon in started:
        daemon.kill()


class Launched:
    """``wsechod --daemon`` while it starts: the invoking command, its pidfile and log."""

    def __init__(self, directory: Path) -> None:
        self.pidfile = directory / "run" / "wsechod.pid"
        self.log = directory / "wsechod.log"
        self.proc = subprocess.Popen(
            [WSECHOD, "--config", "", "--port", "0", "--log-format", "json", "--daemon",
             "--pidfile", str(self.pidfile), "--log-file", str(self.log)],
            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        """The log file's events so far (a line still being written is not one yet)."""
        found = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def wait_for(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The log file's first ``event`` with ``fields`` (re-read every 20 ms until then)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e["event"] == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
            assert time.monotonic() < deadline, f"no {event!r} in the log:\n{self.events()}"
            time.sleep(0.02)

    def kill(self) -> None:
        """The invoking command and the daemon, if either is still there."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(self.pidfile.read_text()), signal.SIGKILL)


@pytest.fixture
def early_daemon(tmp_path: Path) -> Iterator[Callable[[], Launched]]:
    """``wsechod --daemon``, returned as soon as the invoking command blocked the signals."""
    started: list[Launched] = []

    def _early_daemon() -> Launched:
        def launch() -> Launched:
            started.append(Launched(tmp_path / f"try{len(started)}"))
            return started[-1]

        launched: Launched = started_blocked(launch, lambda d: d.proc.pid, Launched.kill)
        return launched

    yield _early_daemon
    for launched in started:
        launched.kill()


# A stand-in for python-daemon's ``daemon``, first on PYTHONPATH: the command's import of
# it waits until the test lets go, then goes on with the real one. So the signal lands,
# deterministically, while the command is being imported: the window this is about.
HOLD = """
import os, sys, time
print('{"event": "held in the import"}', file=sys.stderr, flush=True)
while not os.path.exists(os.environ["RELEASE"]):
    time.sleep(0.01)
sys.path.remove(os.path.dirname(__file__))
del sys.modules[__name__]
import daemon
"""


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1], ids=["SIGTERM", "SIGHUP", "SIGUSR1"]
)
def test_a_signal_while_the_command_is_imported_is_handled_once_it_can_be(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """It used to end the process with the signal's default action (status -15, -1, -10),
    with no log line."""
    (tmp_path / "daemon.py").write_text(HOLD)
    release = tmp_path / "release"
    env = clean_env(PYTHONPATH=str(tmp_path), RELEASE=str(release))
    daemon = Daemon(env=env)
    try:
        daemon.wait_for("held in the import")
        daemon.signal(sig)
        release.touch()
        if sig == signal.SIGTERM:
            assert daemon.wait(10) == 0, daemon.log
            assert daemon.wait_for("stop requested")["reason"] == "SIGTERM"
        else:
            assert daemon.wait_for("settings reloaded: nothing changed")["signal"] == sig.name
            names = [e["event"] for e in daemon.events]
            assert names.index("listening") < names.index("settings reloaded: nothing changed")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(10) == 0, daemon.log
        assert "Traceback" not in daemon.log
    finally:
        daemon.kill()


@pytest.mark.unit
def test_the_entry_point_blocks_every_signal_the_command_handles() -> None:
    assert entry.EARLY_SIGNALS == runner.HANDLED_SIGNALS


def test_the_entry_point_imports_none_of_the_command() -> None:
    """What it imports before it blocks is all the window there is: the package's
    ``__init__`` and the entry module, without ``typing`` or the command."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; import wsechod.process.entry; print(' '.join(sorted(sys.modules)))"],
        env=clean_env(), capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    loaded = set(probe.stdout.split())
    assert {m for m in loaded if m.startswith("wsechod")} == {
        "wsechod",
        "wsechod._version",  # a leaf: one assignment
        "wsechod.process",
        "wsechod.process.entry",
    }
    assert "typing" not in loaded


def time_to_block(argv: list[str]) -> float | None:
    """Seconds from the exec of ``argv`` until /proc shows the handled signals blocked;
    None if this saw its handlers installed first (it was not scheduled in between)."""
    began = time.monotonic()
    proc = subprocess.Popen(
        argv, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            blocked, caught = signal_set(proc.pid, "SigBlk"), signal_set(proc.pid, "SigCgt")
            assert blocked is not None, f"{argv} exited before it blocked the signals"
            if EARLY.issubset(blocked):
                return time.monotonic() - began
            if caught is not None and EARLY.issubset(caught):
                return None
            assert time.monotonic() - began < 10, f"{argv} did not block the signals in 10 s"
            time.sleep(0.0002)
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", COMMANDS, ids=list(COMMANDS))
def test_signals_are_blocked_within_20_ms_of_a_bare_interpreter(command: str) -> None:
    """Interleaved runs, compared by their minima: what load adds to some runs does not
    count, and rounds go on (up to MAX_ROUNDS) while the minima are further apart."""
    argv = [*COMMANDS[command], "--config", "", "--port", "0"]
    bare: list[float] = []
    ours: list[float] = []
    missed = 0
    while len(ours) < MIN_ROUNDS or (min(ours) - min(bare) > BUDGET and len(ours) < MAX_ROUNDS):
        mine = time_to_block(argv)
        if mine is None:  # the handlers were seen first: never blocked, or not seen blocked
            missed += 1
            assert missed < 5, f"{command}: the handlers came before any block, {missed} times"
            continue
        reference = time_to_block([sys.executable, "-c", BARE])
        assert reference is not None
        ours.append(mine)
        bare.append(reference)
    figures = (
        f"{command}: blocked {min(ours) * 1e3:.1f} ms after exec (median "
        f"{sorted(ours)[len(ours) // 2] * 1e3:.1f}), bare interpreter {min(bare) * 1e3:.1f} ms "
        f"(median {sorted(bare)[len(bare) // 2] * 1e3:.1f}), {len(bare)} rounds"
    )
    print(figures)
    assert min(ours) - min(bare) <= BUDGET, figures


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_as_soon_as_blocked_stops_cleanly(
    early: Callable[..., Daemon], sig: signal.Signals
) -> None:
    daemon = early()
    daemon.signal(sig)
    assert daemon.wait(10) == 0, daemon.log
    assert daemon.wait_for("stop requested")["reason"] == sig.name
    daemon.wait_for("stopped")
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_a_reload_signal_as_soon_as_blocked_reloads_once_listening(
    early: Callable[..., Daemon], sig: signal.Signals
) -> None:
    daemon = early()
    daemon.signal(sig)
    reloaded = daemon.wait_for("settings reloaded: nothing changed")
    assert reloaded["signal"] == sig.name
    events = [e["event"] for e in daemon.events]
    assert events.index("listening") < events.index("settings reloaded: nothing changed")
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0, daemon.log


def test_a_stop_signal_as_soon_as_blocked_stops_every_worker(
    early: Callable[..., Daemon],
) -> None:
    daemon = early("--workers", "2")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0, daemon.log
    daemon.wait_for("stop requested", where=lambda e: "worker" not in e)
    for i in range(2):
        daemon.wait_for("stopped", where=of_worker(i))
    daemon.wait_for("stopped", where=lambda e: "worker" not in e)
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_a_reload_signal_as_soon_as_blocked_reloads_every_worker_once_listening(
    early: Callable[..., Daemon], sig: signal.Signals
) -> None:
    daemon = early("--workers", "2")
    daemon.signal(sig)
    for i in range(2):
        reloaded = daemon.wait_for("settings reloaded: nothing changed", where=of_worker(i))
        assert reloaded["signal"] == sig.name
        mine = [e for e in daemon.events if e.get("worker") == i]
        names = [e["event"] for e in mine]
        assert names.index("listening") < names.index("settings reloaded: nothing changed")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0, daemon.log


def test_a_stop_signal_as_soon_as_blocked_stops_the_daemon(
    early_daemon: Callable[[], Launched],
) -> None:
    """The command has not forked yet: the daemon it forks inherits the stop, and makes it
    once up (the command exits 0: the daemon was ready)."""
    launched = early_daemon()
    launched.proc.send_signal(signal.SIGTERM)
    _, err = launched.proc.communicate(timeout=15)
    assert launched.proc.returncode == 0, err
    assert launched.wait_for("stop requested")["reason"] == "SIGTERM"
    launched.wait_for("stopped")
    assert not launched.pidfile.exists()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_a_reload_signal_as_soon_as_blocked_reloads_the_daemon_once_listening(
    early_daemon: Callable[[], Launched], sig: signal.Signals
) -> None:
    launched = early_daemon()
    launched.proc.send_signal(sig)
    _, err = launched.proc.communicate(timeout=15)
    assert launched.proc.returncode == 0, err
    assert launched.wait_for("settings reloaded: nothing changed")["signal"] == sig.name
    names = [e["event"] for e in launched.events()]
    assert names.index("listening") < names.index("settings reloaded: nothing changed")
    pid = int(launched.pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    assert gone(pid, 10)
    launched.wait_for("stopped")


def not_blocking(pid: int) -> bool:
    blocked = signal_set(pid, "SigBlk")
    assert blocked is not None, f"process {pid} is gone"
    return not blocked & EARLY


def test_the_server_does_not_keep_the_signals_blocked(start: Callable[..., Daemon]) -> None:
    """Blocked from the entry point, unblocked once handled: a mask left behind would be
    inherited by every process forked or executed from there."""
    daemon = start()
    assert not_blocking(daemon.proc.pid)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("settings reloaded: nothing changed")


def test_workers_do_not_keep_the_signals_blocked(start: Callable[..., Daemon]) -> None:
    """The main process blocks them on purpose (it waits for them with sigwaitinfo); each
    worker it forks unblocks them."""
    daemon = start("--workers", "2")
    daemon.wait_for("workers ready")
    workers = [e["pid"] for e in daemon.events if e["event"] == "listening"]
    assert len(workers) == 2
    assert all(not_blocking(pid) for pid in workers)


def test_the_daemon_does_not_keep_the_signals_blocked(early_daemon: Callable[[], Launched]) -> None:
    launched = early_daemon()
    _, err = launched.proc.communicate(timeout=15)
    assert launched.proc.returncode == 0, err
    assert not_blocking(int(launched.pidfile.read_text()))
