"""systemd: the notify protocol over a real socket, socket activation with systemd's own
tool and with a socket held across a restart, the units checked by systemd-analyze, and
the units run for real under a private systemd (../shared/systemd/harness.sh)."""

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from websockets.sync.client import connect, unix_connect

from tests import rawws
from tests.conftest import WSECHOD, Daemon, clean_env
from tests.test_echo import http_get

ROOT = Path(__file__).parents[1]
UNITS = ROOT / "systemd"
# The private-systemd harness lives beside the project (../shared); SYSTEMD_HARNESS may
# point elsewhere.
HARNESS = Path(os.environ.get("SYSTEMD_HARNESS", ROOT.parent / "shared" / "systemd" / "harness.sh"))

for tool in ("systemd-analyze", "systemd-socket-activate"):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: `make systemd-tools` installs it", pytrace=False)


# For SYSD_PROBE: ``$(ours)`` lists the wsechod processes of this harness instance only:
# those holding the listening socket of its port (a second copy of the suite on the machine
# runs its own instances, with processes of the same name).
def ours(port: int) -> str:
    return (
        "ours() { for i in $(awk '$2 ~ /:"
        f"{port:04X}"
        '$/ && $4 == "0A" {print $10}\' /proc/net/tcp /proc/net/tcp6); do '
        "for p in $(pgrep -f '^/usr/bin/python3 -m wsechod '); do "
        'ls -l /proc/$p/fd 2>/dev/null | grep -q "socket:\\[$i\\]" && echo $p; '
        "done; done | sort -u; }; "
    )


def run_harness(units: list[str], env: dict[str, str]) -> "subprocess.CompletedProcess[str]":
    """The harness on ``units``. Run again, once, if the private journald got nothing at
    all from the manager (its "manager log" section is empty: seen once with two suites'
    harnesses starting together): the harness's own checks of READY=1 and of the exit
    read that log, and a manager that ran a unit always logs its Starting line."""
    for attempt in (1, 2):
        result = subprocess.run(
            ["bash", str(HARNESS), *units], env=env, capture_output=True, text=True,
            timeout=150, check=False,
        )  # fmt: skip
        section = result.stdout.partition("(key lines)\n")[2].partition("== result")[0]
        if result.returncode == 0 or section.strip() or attempt == 2:
            return result
        print("the manager's log never reached the journal: the harness once more")
    raise AssertionError("unreachable")


class NotifyListener:
    """Plays systemd's side of sd_notify: a datagram socket that records every message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.wall: list[tuple[float, dict[str, str]]] = []  # time.time() of each arrival
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self.wall.append((time.time(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, count: int = 1, timeout: float = 10) -> list[dict[str, str]]:
        def hits() -> list[dict[str, str]]:
            return [m for _, m in self.messages if key in m]

        with self._cond:
            if not self._cond.wait_for(lambda: len(hits()) >= count, timeout):
                raise AssertionError(f"fewer than {count} {key} in {self.messages}")
            return hits()

    def times(self, key: str) -> list[float]:
        with self._cond:
            return [t for t, m in self.messages if key in m]

    def wall_times(self, key: str) -> list[float]:
        with self._cond:
            return [t for t, m in self.wall if key in m]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@wsechod-{os.getpid()}"
    listener = NotifyListener(address)
    yield listener
    listener.close()


def test_notify_ready_status_reload_stopping(
    start: Callable[..., Daemon], notify: NotifyListener
) -> None:
    daemon = start(env=clean_env(NOTIFY_SOCKET=notify.address))
    ready = notify.wait_for("READY")[0]
    ready_at = notify.wall_times("READY")[0]
    # READY=1 means "accepting connections": it comes after the server listens, and the
    # port answers as soon as it has arrived.
    listening_at = datetime.fromisoformat(daemon.wait_for("listening")["timestamp"])
    assert listening_at.timestamp() <= ready_at
    assert http_get(daemon.port, "/healthz")[0] == 200
    assert ready["MAINPID"] == str(daemon.proc.pid)
    assert ready["STATUS"] == f"echo on 127.0.0.1:{daemon.port}: 0 connections"

    daemon.signal(signal.SIGHUP)
    notify.wait_for("RELOADING")
    assert notify.wait_for("READY", count=2)[1]["STATUS"].startswith("echo on")
    reloading = next(m for _, m in notify.messages if "RELOADING" in m)
    assert reloading["MONOTONIC_USEC"].isdigit()

    with connect(daemon.url):
        daemon.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING")[0]
    assert stopping["STATUS"] == "stopping: draining 1 connections"
    assert daemon.wait(10) == 0
    assert notify.times("STOPPING")[0] > notify.times("READY")[-1]


def test_watchdog_pings_from_the_event_loop_at_half_the_interval(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    notify = NotifyListener(str(tmp_path / "notify"))
    env = clean_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000")
    daemon = start(env=env)
    notify.wait_for("WATCHDOG", count=5, timeout=10)
    times = notify.times("WATCHDOG")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"watchdog gaps with WATCHDOG_USEC=1000000: {[round(g, 3) for g in gaps]}")
    assert all(0.3 < gap < 0.9 for gap in gaps[:4]), gaps  # about 0.5 s, never near 1 s
    assert all("STATUS" in m for _, m in notify.messages if "WATCHDOG" in m)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    notify.close()


def test_watchdog_meant_for_another_process_is_not_ours(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    notify = NotifyListener(str(tmp_path / "notify"))
    env = clean_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    start(env=env)
    notify.wait_for("READY")
    time.sleep(1.0)  # an observation window: ours would have pinged about 10 times by now
    assert notify.times("WATCHDOG") == []
    notify.close()


def test_without_notify_socket_nothing_is_sent(start: Callable[..., Daemon]) -> None:
    daemon = start()  # no NOTIFY_SOCKET: the run is the plain foreground one
    assert http_get(daemon.port, "/healthz")[0] == 200
    assert "sd_notify" not in daemon.log


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_systemd_socket_activate_serves_echo() -> None:
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=web",
         WSECHOD, "--config", "", "--log-format", "json", "--port", "1"],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # the tool binds, then waits for the first connection to start us
            try:
                with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
                    ws.send("activated")
                    assert ws.recv(timeout=10) == "activated"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    # It served the inherited socket, not --port 1.
    assert f'"addresses": ["127.0.0.1:{port}"]' in err


def activation_prefix(sock: socket.socket, names: str = "web") -> tuple[tuple[str, ...], int]:
    """A shell trampoline that puts ``sock`` on fd 3 and sets LISTEN_* for the pid it execs,
    as systemd does; the test keeps its own copy of the socket, like systemd."""
    fd = os.dup(sock.fileno())
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={names} exec "$@"'
    return ("bash", "-c", script, "bash"), fd


def test_check_config_shows_socket_activation() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        prefix, fd = activation_prefix(sock)
        result = subprocess.run(
            [*prefix, WSECHOD, "--config", "", "--check-config"],
            env=clean_env(), capture_output=True, text=True, pass_fds=(fd,), timeout=20,
            check=False,
        )  # fmt: skip
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert "# listening sockets: 1 socket(s) from systemd socket activation (web)" in (
        result.stdout
    )


def test_restart_with_a_held_socket_refuses_no_client(start: Callable[..., Daemon]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        prefix, fd = activation_prefix(sock)
        first = start("--port", "1", prefix=prefix, pass_fds=(fd,))
        assert first.port == port
        first.signal(signal.SIGTERM)
        assert first.wait(10) == 0
        # Nobody serves now, but the socket is still listening: a client gets in line...
        with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
            rawws.send_handshake(waiting, port)
            second = start("--port", "1", prefix=prefix, pass_fds=(fd,))
            # ...and is served by the new process once it is up.
            rawws.read_handshake(waiting)
            rawws.send_frame(waiting, rawws.OP_TEXT, b"still here")
            assert rawws.read_frame(waiting) == (rawws.OP_TEXT, b"still here")
        os.close(fd)
        assert second.port == port
        second.signal(signal.SIGTERM)
        assert second.wait(10) == 0


def test_restart_during_a_drain_hands_newcomers_to_the_next_process(
    start: Callable[..., Daemon],
) -> None:
    """With systemd's socket, a stopping wsechod stops accepting at once: a client that
    arrives while it drains waits in the backlog for the next process instead of getting
    503 from the old one."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        prefix, fd = activation_prefix(sock)
        first = start("--drain-timeout", "1", "--close-timeout", "60", prefix=prefix,
                      pass_fds=(fd,))  # fmt: skip
        stubborn = rawws.connect(port)  # never answers the close: holds the drain open
        first.signal(signal.SIGTERM)
        first.wait_for("stop requested")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as newcomer:
            rawws.send_handshake(newcomer, port)
            assert first.wait(5) == 0
            stubborn.close()
            second = start(prefix=prefix, pass_fds=(fd,))
            rawws.read_handshake(newcomer)  # 101 from the new process, not 503 from the old
            rawws.send_frame(newcomer, rawws.OP_TEXT, b"next")
            assert rawws.read_frame(newcomer) == (rawws.OP_TEXT, b"next")
        os.close(fd)
        second.signal(signal.SIGTERM)
        assert second.wait(10) == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_unix_sockets_from_systemd_are_served(
    start: Callable[..., Daemon], tmp_path: Path, kind: str
) -> None:
    address = str(tmp_path / "ws.sock") if kind == "path" else f"\0wsechod-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(address)
        sock.listen()
        prefix, fd = activation_prefix(sock)
        daemon = start(prefix=prefix, pass_fds=(fd,))
        os.close(fd)
        shown = address if kind == "path" else "@" + address[1:]
        assert daemon.address == shown
        with unix_connect(address, uri="ws://localhost/") as ws:
            ws.send("over unix")
            assert ws.recv(timeout=10) == "over unix"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0


def test_passed_fd_that_is_not_a_listening_socket_is_refused(tmp_path: Path) -> None:
    with (tmp_path / "not-a-socket").open("w") as f:
        fd = f.fileno()
        result = subprocess.run(
            ["bash", "-c", f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "bash",
             WSECHOD, "--config", ""],
            env=clean_env(), capture_output=True, text=True, pass_fds=(fd,), timeout=20,
            check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("wsechod: error: socket activation: fd 3: ")


def installed_units(directory: Path) -> dict[str, Path]:
    """The shipped units with the console script of this machine, as install-systemd does."""
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-units", f"DESTDIR={directory}",
         f"WSECHOD={WSECHOD}"],
        check=True, timeout=60,
    )  # fmt: skip
    unit_dir = directory / "etc" / "systemd" / "system"
    return {p.name: p for p in unit_dir.iterdir()}


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    assert set(units) == {
        "wsechod.service",
        "wsechod.socket",
        "wsechod@.service",
        "wsechod-activated.service",
        "wsechod-activated.socket",
    }
    for service in ("wsechod.service", "wsechod-activated.service"):
        assert f"ExecStart={WSECHOD} --config /etc/wsechod/wsechod.toml" in (
            units[service].read_text()
        )
    instance = tmp_path / "wsechod@demo.service"
    instance.write_text(units["wsechod@.service"].read_text())
    for unit in (*(u for n, u in units.items() if "@" not in n), instance):
        result = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            capture_output=True, text=True, timeout=60, check=False, cwd=unit.parent,
        )  # fmt: skip
        # verify exits 0 even on some warnings: any output at all is a failure.
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), unit.name


@pytest.mark.parametrize(
    ("unit", "most"),
    [
        ("wsechod.service", 1.1),
        ("wsechod@.service", 1.1),
        ("wsechod-activated.service", 0.7),  # no network of its own
    ],
)
def test_units_are_hardened(tmp_path: Path, unit: str, most: float) -> None:
    path = installed_units(tmp_path)[unit]
    if "@" in unit:
        path = path.rename(tmp_path / "wsechod@demo.service")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security exposure for {unit}: {score}")
    assert score <= most


def harness_reason() -> str | None:
    if not HARNESS.exists():
        return f"{HARNESS} is not beside the project (set SYSTEMD_HARNESS)"
    if os.geteuid() != 0:
        return "the systemd harness needs root"
    if Path("/run/systemd/system").exists():
        return "this host runs systemd as PID 1; the harness is for hosts where it does not"
    # ProtectHome hides this interpreter's home, so the unit runs the system's Python on
    # this venv's packages: it must exist and be the same minor version.
    system = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True, text=True, timeout=20, check=False,
    ) if Path("/usr/bin/python3").exists() else None  # fmt: skip
    if system is None or system.stdout.strip() != str(sys.version_info[:2]):
        return f"no /usr/bin/python3 of version {sys.version_info[:2]} for the unit to run"
    return None


HARNESS_REASON = harness_reason()


# Each variant: the units to run (the one under test first) and the socket unit, if any.
VARIANTS = {
    "service": ("wsechod.service", None),
    "socket": ("wsechod.service", "wsechod.socket"),
    "activated": ("wsechod-activated.service", "wsechod-activated.socket"),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unit_runs_under_a_real_systemd(tmp_path: Path, variant: str) -> None:
    """Start (READY=1), is-active, reload (SIGHUP), stop (SIGTERM, exit 0): the shipped
    hardened units, with only ExecStart pointed at this checkout (and the socket's port).
    The activated variant serves from a network namespace of its own."""
    if HARNESS_REASON is not None:
        if os.environ.get("CI") and not HARNESS.exists():
            pytest.fail(f"CI must run the real-systemd tests: {HARNESS_REASON}")
        pytest.skip(HARNESS_REASON)
    service_name, socket_name = VARIANTS[variant]
    units = installed_units(tmp_path / "root")
    work = tmp_path / "unit"
    work.mkdir()
    work.chmod(0o755)  # the service runs as a DynamicUser
    (work / "wsechod.toml").write_text('port = 0\nlog_level = "debug"\n')
    (work / "wsechod.toml").chmod(0o644)
    service = (
        units[service_name]
        .read_text()
        .replace(
            f"ExecStart={WSECHOD} --config /etc/wsechod/wsechod.toml",
            # The system's Python on this checkout and this venv's packages, bound under /srv.
            "Environment=PYTHONPATH=/srv/wsechod/src:/srv/wsechod/site\n"
            "ExecStart=/usr/bin/python3 -m wsechod --config /srv/wsechod/cfg/wsechod.toml",
        )
    )
    (work / service_name).write_text(service)
    files = [str(work / service_name)]
    env = clean_env(
        SYSD_BIND=f"{ROOT}:/srv/wsechod/src {sysconfig.get_paths()['purelib']}:/srv/wsechod/site "
        f"{work}:/srv/wsechod/cfg",
        SYSD_TIMEOUT="30",
    )
    if socket_name is not None:
        port = free_port()
        socket_unit = units[socket_name].read_text()
        (work / socket_name).write_text(socket_unit.replace("8765", str(port)))
        files.insert(0, str(work / socket_name))
        # Served through the socket; then the network namespaces of the service and ours.
        env["SYSD_PROBE"] = (
            f"{ours(port)}curl -s --max-time 10 http://127.0.0.1:{port}/healthz && echo && "
            "for p in $(ours); do "
            'echo "netns service $(readlink /proc/$p/ns/net)"; done; '
            'echo "netns host $(readlink /proc/self/ns/net)"; '
            # The socket's backlog once wsechod listens on it again: the unit's Backlog=.
            f"echo \"backlog $(ss -ltnH 'sport = :{port}' | awk '{{print $3}}')\""
        )
    result = run_harness(files, env)
    print(result.stdout[-3000:])
    print("\n".join(ln for ln in result.stdout.splitlines() if re.search("netns|Uid:", ln)))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "READY=1 received" in result.stdout or "Got notification message" in result.stdout
    assert "main process exited 0 on SIGTERM" in result.stdout or "status=0/SUCCESS" in (
        result.stdout
    )
    if socket_name is not None:
        assert "Passing 1 fds to service" in result.stdout
        assert "| ok" in result.stdout  # /healthz through systemd's socket
        found = re.findall(r"\| netns (service|host) (\S+)", result.stdout)
        netns = dict(found)
        assert len(found) == 2 and set(netns) == {"service", "host"}, found
        # Only the activated variant has a network of its own.
        assert (netns["service"] != netns["host"]) == (variant == "activated"), netns
        backlog = re.search(r"^Backlog=(\d+)$", socket_unit, re.MULTILINE)
        assert backlog is not None
        assert re.findall(r"\| backlog (\S+)", result.stdout) == [backlog[1]]
