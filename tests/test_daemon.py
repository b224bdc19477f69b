"""Daemon mode with a real double fork: readiness, pidfile, log files, privilege drop."""

import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from tests.conftest import WSECHOD, Daemon, clean_env, peer_port, run_cli
from wsechod.process import pidfile as pidfile_module
from wsechod.process.pidfile import PidFile, PidFileError

IS_ROOT = os.geteuid() == 0


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_log(path: Path, event: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the JSON log file has ``event`` (the file is re-read every 20 ms; the
    condition, not the interval, ends the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            for entry in read_log(path):
                if entry.get("event") == event:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} in {path}")
        time.sleep(0.02)


def gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a zombie counts), waiting on a pidfd, not a loop."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = stat_fields(int(entry.name))[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


class Detached:
    """A wsechod started with --daemon; its pidfile and log file."""

    def __init__(self, directory: Path, *args: str, log: Path | None = None) -> None:
        self.pidfile = directory / "run" / "wsechod.pid"
        self.log = log if log is not None else directory / "wsechod.log"
        started = time.monotonic()
        self.result = run_cli(
            "--config", "", "--port", "0", "--daemon",
            "--pidfile", str(self.pidfile), "--log-file", str(self.log), *args,
        )  # fmt: skip
        self.elapsed = time.monotonic() - started

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text())

    @functools.cached_property
    def port(self) -> int:
        address = wait_for_log(self.log, "listening")["addresses"][0]
        return int(address.rsplit(":", 1)[1])


@pytest.fixture
def detach(tmp_path: Path) -> Iterator[Any]:
    """Start daemons; any still alive at the end are killed."""
    started: list[Detached] = []

    def _detach(*args: str, directory: Path = tmp_path, log: Path | None = None) -> Detached:
        d = Detached(directory, *args, log=log)
        started.append(d)
        return d

    yield _detach
    for d in started:
        for pid in processes_mentioning(str(d.pidfile)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that an unprivileged user can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="wsechod-test-", dir="/tmp"))
    path.chmod(0o755)
    logs = path / "logs"
    logs.mkdir()
    os.chown(logs, 65534, 65534)
    yield path
    shutil.rmtree(path)


def echo_once(port: int, message: str = "hello") -> str:
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send(message)
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str)
        return reply


def test_daemon_detaches_serves_and_drains_on_sigterm(detach: Any) -> None:
    d = detach()
    assert d.result.returncode == 0, d.result.stderr
    # Ready means listening: the event is in the log the moment the command returns.
    assert "listening" in [e["event"] for e in read_log(d.log)]
    assert d.result.stderr == ""
    assert d.elapsed < 5
    pid = d.pid
    state, ppid, _pgrp, session, tty_nr = stat_fields(pid)[:5]
    assert state != "Z"
    assert int(ppid) != os.getpid()  # not our child: it was double-forked away
    assert int(session) != os.getsid(0)  # a session of its own (setsid)...
    assert int(session) != pid  # ...that it does not lead: it can never get a terminal
    assert int(tty_nr) == 0  # no controlling terminal
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert "Umask:\t0022" in Path(f"/proc/{pid}/status").read_text()
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert echo_once(d.port) == "hello"

    with connect(f"ws://127.0.0.1:{d.port}/") as ws:
        os.kill(pid, signal.SIGTERM)
        with pytest.raises(ConnectionClosedOK) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1001
    assert gone(pid, 10)
    assert not d.pidfile.exists()
    assert wait_for_log(d.log, "drained")["connections"] == 1
    wait_for_log(d.log, "stopped")


def test_stale_pidfile_is_taken_over_with_a_warning(detach: Any, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wsechod.pid").write_text(f"{dead.pid}\n")
    d = detach()
    assert d.result.returncode == 0, d.result.stderr
    assert d.pid not in (dead.pid, os.getpid())
    assert not gone(d.pid, 0)
    warning = wait_for_log(d.log, "stale pidfile taken over")
    assert (warning["pid"], warning["level"]) == (str(dead.pid), "warning")
    assert echo_once(d.port) == "hello"


def test_second_daemon_on_the_same_pidfile_is_refused(detach: Any, tmp_path: Path) -> None:
    first = detach()
    assert first.result.returncode == 0, first.result.stderr
    pid = first.pid
    second = detach(log=tmp_path / "second.log")
    assert second.result.returncode == 1
    assert second.result.stderr == f"wsechod: error: already running (pid {pid})\n"
    assert first.pid == pid
    assert echo_once(first.port) == "hello"  # the first one is untouched


def test_port_in_use_with_daemon_fails_on_the_terminal(detach: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        d = detach("--port", str(port))
    assert d.result.returncode == 1
    assert d.result.stderr == (
        f"wsechod: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert not d.pidfile.exists()
    assert processes_mentioning(str(d.pidfile)) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--log-file", "{tmp}"), "cannot open log file {tmp}: Is a directory"),
        (
            ("--log-file", "syslog", "--syslog-socket", "{tmp}/no-such-dir/log"),
            "cannot log to syslog at {tmp}/no-such-dir/log: No such file or directory",
        ),
    ],
    ids=["log-file", "syslog"],
)
def test_failure_after_the_fork_is_reported_and_nothing_is_left(
    detach: Any, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    d = detach(*(a.format(tmp=tmp_path) for a in args))
    assert d.result.returncode == 1
    assert d.result.stderr == f"wsechod: error: {expected.format(tmp=tmp_path)}\n"
    assert not d.pidfile.exists()
    assert processes_mentioning(str(d.pidfile)) == []


def test_daemon_without_log_file_logs_to_syslog(detach: Any, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(tmp_path / "log"))
        syslog.settimeout(10)
        pidfile = tmp_path / "run" / "wsechod.pid"
        result = run_cli(
            "--config", "", "--port", "0", "--daemon", "--pidfile", str(pidfile),
            "--syslog-socket", str(tmp_path / "log"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        pid = int(pidfile.read_text())
        try:
            first = syslog.recv(65536).decode()
        finally:
            os.kill(pid, signal.SIGTERM)
        assert gone(pid, 10)
    # <30> is facility daemon (3), severity info (6).
    assert first.startswith("<30>wsechod: ")
    assert json.loads(first.removeprefix("<30>wsechod: ").rstrip("\x00"))["event"] == "starting"


def test_sighup_reopens_the_log_file_and_no_line_is_lost(detach: Any, tmp_path: Path) -> None:
    d = detach("--log-level", "debug")
    assert d.result.returncode == 0, d.result.stderr
    ports: list[int] = []

    def clients(n: int) -> None:
        for _ in range(n):
            with connect(f"ws://127.0.0.1:{d.port}/") as ws:
                ports.append(ws.local_address[1])
                ws.send("x")
                assert ws.recv(timeout=10) == "x"

    clients(5)
    rotated = d.log.with_suffix(".log.1")
    d.log.rename(rotated)  # what logrotate does
    clients(5)  # still written to the renamed file, until SIGHUP
    pid = d.pid
    os.kill(pid, signal.SIGHUP)
    wait_for_log(d.log, "log file reopened")
    clients(5)
    os.kill(pid, signal.SIGTERM)
    assert gone(pid, 10)

    old, new = read_log(rotated), read_log(d.log)
    opened = [peer_port(e) for e in old + new if e["event"] == "connection open"]
    assert sorted(opened) == sorted(ports)
    assert [e["event"] for e in old][:2] == ["starting", "listening"]
    assert new[0]["event"] == "log file reopened"
    assert new[-1]["event"] == "stopped"
    assert all(peer_port(e) in ports[10:] for e in new if "peer" in e)


def free_low_port() -> int:
    """A free port below 1024, which only root may bind."""
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024")


@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs the tests to run as root")
def test_root_binds_a_low_port_then_runs_as_the_requested_user(
    detach: Any, shared_dir: Path
) -> None:
    port = free_low_port()
    d = detach(
        "--user", "nobody", "--group", "nogroup", "--port", str(port),
        directory=shared_dir, log=shared_dir / "logs" / "wsechod.log",
    )  # fmt: skip
    assert d.result.returncode == 0, d.result.stderr
    status = Path(f"/proc/{d.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split() == ["65534"] * 4
    assert fields["Gid"].split() == ["65534"] * 4
    expected = sorted(str(g) for g in os.getgrouplist("nobody", 65534))
    assert sorted(fields["Groups"].split()) == expected  # nobody's groups, none of root's
    assert d.pidfile.parent.stat().st_uid == 65534  # the directory was made for the user
    assert echo_once(port) == "hello"
    pid = d.pid
    os.kill(pid, signal.SIGTERM)
    assert gone(pid, 10)
    assert not d.pidfile.exists()  # the unprivileged daemon could remove it


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start as root and drop to nobody")
def test_pidfile_directory_the_user_cannot_write_is_reported(detach: Any, shared_dir: Path) -> None:
    (shared_dir / "run").mkdir()  # exists, owned by root: nobody cannot write there
    d = detach("--user", "nobody", directory=shared_dir, log=shared_dir / "logs" / "w.log")
    assert d.result.returncode == 1
    assert d.result.stderr == (
        f"wsechod: error: cannot open pidfile {d.pidfile}: Permission denied\n"
    )
    assert processes_mentioning(str(d.pidfile)) == []


def test_foreground_pidfile_is_written_locked_and_removed(start: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "fg.pid"
    daemon: Daemon = start("--pidfile", str(pidfile))
    assert pidfile.read_text() == f"{daemon.proc.pid}\n"
    again = run_cli("--config", "", "--port", "0", "--pidfile", str(pidfile), env=clean_env())
    assert again.returncode == 1
    assert again.stderr == f"wsechod: error: already running (pid {daemon.proc.pid})\n"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(5) == 0
    assert not pidfile.exists()


def test_failed_log_reopen_keeps_the_daemon_and_the_old_file(detach: Any, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    d = detach(log=logs / "wsechod.log")
    assert d.result.returncode == 0, d.result.stderr
    pid, port = d.pid, d.port
    moved = tmp_path / "moved"
    logs.rename(moved)  # the log's directory is gone: reopening the path must fail
    os.kill(pid, signal.SIGHUP)
    warning = wait_for_log(moved / "wsechod.log", "cannot reopen log file")
    assert warning["level"] == "warning"
    assert echo_once(port) == "hello"  # still serving, still logging to the old file
    os.kill(pid, signal.SIGTERM)
    assert gone(pid, 10)
    wait_for_log(moved / "wsechod.log", "stopped")


def test_interrupted_start_leaves_nothing_running(tmp_path: Path) -> None:
    """Ctrl-C (here SIGTERM) on the command while the daemon is stuck starting up: the
    daemon is stopped and its pidfile removed, not left half-started."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)  # opening it for writing blocks: the daemon cannot become ready
    pidfile = tmp_path / "run" / "wsechod.pid"
    launcher = subprocess.Popen(
        [WSECHOD, "--config", "", "--port", "0", "--daemon", "--pidfile", str(pidfile),
         "--log-file", str(fifo)],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists():  # the daemon has detached and written its pidfile
            assert time.monotonic() < deadline, "the daemon never wrote its pidfile"
            time.sleep(0.02)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
        for pid in processes_mentioning(str(pidfile)):
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert "interrupted" in err
    assert processes_mentioning(str(pidfile)) == []
    assert not pidfile.exists()


LONG_LABEL_HOST = "x" * 64 + ".invalid"  # no resolver is asked: the name itself is invalid


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--log-file", "{tmp}/file/logs/wsechod.log"),
            "cannot create log directory {tmp}/file/logs: Not a directory",
        ),
        (("--log-file", "{tmp}"), "cannot open log file {tmp}: Is a directory"),
        (
            ("--pidfile", "{tmp}/file/run/wsechod.pid"),
            "cannot create {tmp}/file/run: Not a directory",
        ),
        (
            ("--daemon", "--syslog-socket", "{tmp}/no-syslog"),
            "cannot log to syslog at {tmp}/no-syslog: No such file or directory "
            "(a daemon without --log-file logs to syslog: give --log-file PATH)",
        ),
        (
            ("--host", LONG_LABEL_HOST),
            f"cannot resolve host {LONG_LABEL_HOST!r}: label empty or too long",
        ),
    ],
    ids=["log-directory", "log-file", "pidfile-directory", "no-syslog", "host"],
)
def test_check_config_reports_what_the_start_fails_on(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    """--check-config exits 1 with the line the start then prints (also exit 1)."""
    (tmp_path / "file").write_text("a file where a directory is needed\n")
    argv = ["--config", "", "--port", "0", *(a.format(tmp=tmp_path) for a in args)]
    line = f"wsechod: error: {expected.format(tmp=tmp_path)}\n"
    checked = run_cli("--check-config", *argv)
    assert (checked.returncode, checked.stderr) == (1, line)
    assert "port = 0  # --port" in checked.stdout  # the settings are shown all the same
    started = run_cli(*argv)
    assert (started.returncode, started.stderr) == (1, line)


def test_missing_log_directory_is_created_at_start_not_by_check_config(
    detach: Any, tmp_path: Path
) -> None:
    """The daemon example (docs/deploy.md, Daemon mode) on a fresh machine: /var/log/wsechod
    does not exist."""
    log = tmp_path / "var" / "log" / "wsechod" / "wsechod.log"
    checked = run_cli("--check-config", "--config", "", "--daemon", "--log-file", str(log))
    assert (checked.returncode, checked.stderr) == (0, "")
    assert not (tmp_path / "var").exists()  # checking changes nothing
    d = detach(log=log)
    assert d.result.returncode == 0, d.result.stderr
    assert wait_for_log(log, "listening")["level"] == "info"
    assert echo_once(d.port) == "hello"


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start as root and drop to nobody")
def test_missing_log_directory_is_created_for_the_user(detach: Any, shared_dir: Path) -> None:
    log = shared_dir / "var-log" / "wsechod" / "wsechod.log"
    d = detach("--user", "nobody", directory=shared_dir, log=log)
    assert d.result.returncode == 0, d.result.stderr
    assert log.parent.stat().st_uid == 65534  # the user's, like the pidfile's directory
    assert log.stat().st_uid == 65534
    # Rotation works because the user can create the new file there.
    log.rename(log.with_suffix(".log.1"))
    os.kill(d.pid, signal.SIGHUP)
    assert wait_for_log(log, "log file reopened")["level"] == "info"
    assert log.stat().st_uid == 65534


@pytest.mark.skipif(not IS_ROOT, reason="needs root to check as, and drop to, nobody")
@pytest.mark.parametrize(
    ("args", "checked_line", "started_line"),
    [
        (
            ("--log-file", "{root}/wsechod.log"),
            "cannot open log file {root}/wsechod.log: Permission denied",
            "cannot open log file {root}/wsechod.log: Permission denied",
        ),
        (
            ("--pidfile", "{root}/wsechod.pid"),
            "cannot write pidfile in {root}: Permission denied",
            "cannot open pidfile {root}/wsechod.pid: Permission denied",
        ),
    ],
    ids=["log-file", "pidfile"],
)
def test_check_config_checks_writes_as_the_user(
    shared_dir: Path, args: tuple[str, ...], checked_line: str, started_line: str
) -> None:
    """Root may write anywhere; the daemon writes as --user: that is what is checked."""
    root_only = shared_dir / "root-only"
    root_only.mkdir()  # exists, owned by root: nobody cannot write there
    argv = ["--config", "", "--port", "0", "--user", "nobody"]
    argv += [a.format(root=root_only) for a in args]
    checked = run_cli("--check-config", *argv)
    assert checked.returncode == 1
    assert checked.stderr == f"wsechod: error: {checked_line.format(root=root_only)}\n"
    started = run_cli(*argv)
    assert started.returncode == 1
    assert started.stderr == f"wsechod: error: {started_line.format(root=root_only)}\n"
    # Writable by the user: the same check passes.
    os.chown(root_only, 65534, 65534)
    assert run_cli("--check-config", *argv).returncode == 0


JOURNAL = ("bash", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "-")


def test_lines_to_the_journal_carry_their_priority(start: Any) -> None:
    """Under systemd (JOURNAL_STREAM names stderr), journalctl -p can filter our lines."""
    daemon: Daemon = start("--log-level", "debug", "--relay-echo", prefix=JOURNAL)
    assert echo_once(daemon.port) == "hello"
    daemon.wait_for("connection closed")
    priorities: dict[str, str] = {}
    for line in daemon.raw:
        assert re.match(r"<[0-7]>\{", line), line
        priorities.setdefault(json.loads(line[3:])["event"], line[:3])
    assert priorities["listening"] == "<6>"
    assert priorities["settings have no effect in echo mode"] == "<4>"
    assert priorities["connection open"] == "<7>"
    failed = subprocess.run(
        [*JOURNAL, WSECHOD, "--config", "", "--host", LONG_LABEL_HOST],
        env=clean_env(), capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.startswith("<3>wsechod: error: cannot resolve host")


def test_no_priority_when_the_journal_stream_is_not_stderr(start: Any) -> None:
    """An inherited JOURNAL_STREAM (stderr redirected elsewhere) must not garble lines."""
    env = clean_env(JOURNAL_STREAM="0:0")
    daemon: Daemon = start("--relay-echo", env=env)
    daemon.wait_for("settings have no effect in echo mode")
    assert all(line.startswith("{") for line in daemon.raw), daemon.log
    journal = ("bash", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/1) exec "$@"', "-")
    other: Daemon = start("--relay-echo", prefix=journal)  # names stdout, not stderr
    other.wait_for("settings have no effect in echo mode")
    assert all(line.startswith("{") for line in other.raw), other.log


@pytest.mark.unit
def test_pidfile_replaced_between_open_and_lock_is_not_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starter pauses between opening the pidfile and locking it; meanwhile the holder
    exits and a third starter takes over. The paused one must not become a second holder."""
    path = tmp_path / "wsechod.pid"
    holder, third, paused = PidFile(path), PidFile(path), PidFile(path)
    holder.acquire()
    real_lock = pidfile_module._try_lock
    interleaved: list[int] = []

    def lock_after_a_takeover(fd: int) -> bool:
        if not interleaved:
            interleaved.append(fd)
            holder.release()  # the holder exits, removing its pidfile...
            third.acquire()  # ...and a third starter takes the path over
        return real_lock(fd)

    monkeypatch.setattr(pidfile_module, "_try_lock", lock_after_a_takeover)
    try:
        with pytest.raises(PidFileError, match=rf"^already running \(pid {os.getpid()}\)$"):
            paused.acquire()
        assert interleaved, "the interleaving did not happen"
        st = path.stat()
        assert (st.st_dev, st.st_ino) == third._inode  # the third one's file, untouched
    finally:
        paused.release()
        third.release()
    assert not path.exists()


@pytest.mark.unit
def test_pidfile_that_keeps_being_replaced_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wsechod.pid"
    real_lock = pidfile_module._try_lock

    def replaced_before_each_lock(fd: int) -> bool:
        path.unlink()
        path.write_text("1\n")  # another file at the path each time
        return real_lock(fd)

    monkeypatch.setattr(pidfile_module, "_try_lock", replaced_before_each_lock)
    starter = PidFile(path)
    with pytest.raises(PidFileError, match="it keeps being replaced"):
        starter.acquire()
    assert starter._fds == []  # nothing held
