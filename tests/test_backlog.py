"""The listen backlog: what each listening socket holds until it is accepted, as the
kernel reports it (``ss``: a listening socket's Send-Q is its backlog). The event loop
listens again on every socket it serves, so this is checked once wsechod serves: on its
own listeners, on each worker's copies, and on a socket systemd passes."""

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.conftest import WSECHOD, Daemon, clean_env, run_cli
from tests.test_systemd import activation_prefix, free_port
from tests.test_tls import issue, trusting
from tests.test_workers import WORKERS, pids, start_workers, wait_until
from wsechod.settings import kernel_backlog

GIVEN = 1234  # below the kernel's maximum, and not what anything else would pick


def backlogs(*query: str) -> list[int]:
    """The Send-Q of each listening socket ``ss`` lists for ``query`` (its filter)."""
    out = subprocess.run(
        ["ss", "-lnH", *query], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    # Netid (with -x only) State Recv-Q Send-Q ...
    return [int(line.split()[3 if query[0] == "-x" else 2]) for line in out.splitlines()]


def tcp(port: int) -> list[int]:
    return backlogs("-t", f"sport = :{port}")


def unix(path: Path) -> list[int]:
    return backlogs("-x", f"src {path}")


@pytest.mark.parametrize("given", [None, str(GIVEN)])
def test_own_listeners_keep_the_backlog(
    start: Callable[..., Daemon], tmp_path: Path, given: str | None
) -> None:
    """Not the event loop's 100: the setting, by default the kernel's maximum."""
    path = tmp_path / "ws.sock"
    args = ["--listen", "127.0.0.1:0", "--listen", f"unix:{path}"]
    daemon = start(*args, *(["--backlog", given] if given else []))
    expected = int(given) if given else kernel_backlog()
    assert tcp(daemon.port) == [expected]
    assert unix(path) == [expected]


def test_each_workers_copy_has_the_backlog(start: Callable[..., Daemon]) -> None:
    """Each worker's copy of a TCP listener, also that of a worker started again."""
    daemon = start_workers(start, "--backlog", str(GIVEN))
    assert tcp(daemon.port) == [GIVEN] * WORKERS
    victim = pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    daemon.wait_for("listening", where=lambda e: e["worker"] == 0 and e["pid"] != victim)
    assert tcp(daemon.port) == [GIVEN] * WORKERS


def test_socket_activated_sockets_get_the_backlog() -> None:
    """systemd's socket has its unit's Backlog=; the event loop listens on it again, with
    the setting (a socket's backlog cannot be read back to keep it)."""
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", WSECHOD, "--config", "",
         "--log-format", "json", "--backlog", str(GIVEN)],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # the tool binds, then starts wsechod on the first connection
            try:
                with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
                    ws.send("activated")
                    assert ws.recv(timeout=10) == "activated"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.05)
        wait_until(lambda: tcp(port) == [GIVEN], what=f"backlog {GIVEN}: {tcp(port)}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err


def test_systemds_socket_served_with_tls_gets_the_backlog(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    """With TLS the engine accepts on the socket itself (no event loop server to listen
    again): it listens again with the setting all the same."""
    files = issue(tmp_path)
    with socket.create_server(("127.0.0.1", 0), backlog=5) as sock:
        port = sock.getsockname()[1]
        prefix, fd = activation_prefix(sock)
        daemon = start("--tls-cert", str(files.cert), "--tls-key", str(files.key),
                       "--backlog", str(GIVEN), prefix=prefix, pass_fds=(fd,))  # fmt: skip
        os.close(fd)
        assert daemon.port == port
        assert tcp(port) == [GIVEN]
        with connect(f"wss://127.0.0.1:{port}/", ssl=trusting(files.ca), open_timeout=30) as ws:
            ws.send("over tls")
            assert ws.recv(timeout=30) == "over tls"


def test_max_is_the_kernels_maximum() -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert kernel_backlog() == min(somaxconn, 65535)
    result = run_cli("--config", "", "--check-config", "--backlog", "max")
    assert f"\nbacklog = {kernel_backlog()}  # --backlog (max)\n" in result.stdout
    result = run_cli("--config", "", "--check-config")
    assert f"\nbacklog = {kernel_backlog()}  # default\n" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "toml", "expected"),
    [
        (["--backlog", "0"], {}, None, "invalid backlog '0' (from --backlog): must be between 1 "
         "and 65535"),
        ([], {"WSECHOD_BACKLOG": "70000"}, None,
         "invalid backlog '70000' (from WSECHOD_BACKLOG): must be between 1 and 65535"),
        (["--backlog", "lots"], {}, None,
         "invalid backlog 'lots' (from --backlog): expected an integer (or max)"),
        ([], {}, "backlog = 12.5", "invalid backlog 12.5 (from "),
        ([], {}, 'backlog = "4096"', "invalid backlog '4096' (from "),
    ],
)  # fmt: skip
def test_bad_backlog_exits_2(
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
