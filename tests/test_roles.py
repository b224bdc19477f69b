"""Listener roles: what a listener serves (public: WebSocket clients; ops: /healthz and
/metrics; api: the HTTP API), so that operations endpoints can live on a port of their
own. A request for what its listener does not serve gets 404 with a reason."""

import os
import signal
import socket
import subprocess
from collections.abc import Callable

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import WSECHOD, Daemon, clean_env, run_cli
from tests.test_echo import http_get as http


def http_get(port: int, path: str) -> tuple[int, str]:
    status, body, _ = http(port, path)
    return status, body


PUBLIC_AND_OPS = ("--listen", "127.0.0.1:0 public", "--listen", "127.0.0.1:0 ops")


def ports(daemon: Daemon) -> list[int]:
    listening = daemon.wait_for("listening")
    return [int(str(address).rsplit(":", 1)[1]) for address in listening["addresses"]]


def echo(port: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"


def refused(port: int) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        connect(f"ws://127.0.0.1:{port}/", open_timeout=10)
    response = caught.value.response
    return response.status_code, response.body.decode() if response.body else ""


def check_split(public: int, ops: int) -> None:
    echo(public)
    assert http_get(public, "/healthz") == (
        404,
        "not found: /healthz is served on the operations listener\n",
    )
    assert http_get(public, "/metrics")[0] == 404
    assert http_get(ops, "/healthz") == (200, "ok\n")
    status, page = http_get(ops, "/metrics")
    assert status == 200 and "wsechod_connections_open" in page
    assert refused(ops) == (404, "not found: this listener serves no WebSocket clients\n")
    assert http_get(ops, "/")[0] == 404


def test_operations_on_a_listener_of_their_own(start: Callable[..., Daemon]) -> None:
    daemon = start(*PUBLIC_AND_OPS)
    public, ops = ports(daemon)
    check_split(public, ops)
    assert daemon.wait_for("listening")["roles"] == [["public"], ["ops"]]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_for("drained")["refused_listener"] == 4  # counted, as /metrics shows


def test_with_workers_each_keeps_its_roles(start: Callable[..., Daemon]) -> None:
    daemon = start(*PUBLIC_AND_OPS, "--workers", "2")
    daemon.wait_for("workers ready", timeout=30)
    public, ops = ports(daemon)
    for _ in range(4):  # whichever worker answers
        check_split(public, ops)


def test_systemd_names_its_sockets_roles(start: Callable[..., Daemon]) -> None:
    """FileDescriptorName=public and =ops (socket units of their own, one service)."""
    with (
        socket.create_server(("127.0.0.1", 0)) as web,
        socket.create_server(("127.0.0.1", 0)) as operations,
    ):
        fds = [os.dup(web.fileno()), os.dup(operations.fileno())]
        script = (
            f"exec 3<&{fds[0]} 4<&{fds[1]} {fds[0]}<&- {fds[1]}<&-; "
            'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=public:ops exec "$@"'
        )
        daemon = start(prefix=("bash", "-c", script, "bash"), pass_fds=tuple(fds))
        for fd in fds:
            os.close(fd)
        check_split(web.getsockname()[1], operations.getsockname()[1])
    assert daemon.wait_for("listening")["roles"] == [["public"], ["ops"]]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0


def test_a_name_that_is_not_roles_serves_all(start: Callable[..., Daemon]) -> None:
    """The shipped socket unit's FileDescriptorName=wsechod, systemd's default "stdin"."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        fd = os.dup(sock.fileno())
        script = (
            f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=wsechod exec "$@"'
        )
        daemon = start(prefix=("bash", "-c", script, "bash"), pass_fds=(fd,))
        os.close(fd)
        port = sock.getsockname()[1]
        echo(port)
        assert http_get(port, "/healthz") == (200, "ok\n")
    assert daemon.wait_for("listening")["roles"] == [["api", "ops", "public"]]


def test_roles_are_checked_and_shown() -> None:
    result = run_cli("--config", "", "--check-config", *PUBLIC_AND_OPS)
    assert result.returncode == 0, result.stderr
    assert "# listening sockets: 127.0.0.1:0 public, 127.0.0.1:0 ops" in result.stdout
    bad = run_cli("--config", "", "--check-config", "--listen", "127.0.0.1:9100 opps")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "wsechod: error: invalid listen '127.0.0.1:9100 opps' (from --listen): unknown role "
        "'opps': a listener's roles are public, ops, api"
    ]
    twice = run_cli("--config", "", "--listen", "127.0.0.1:9100 ops,127.0.0.1:9100 public")
    assert twice.returncode == 2 and "'127.0.0.1:9100' is listed twice" in twice.stderr


def test_a_role_served_nowhere_is_a_warning() -> None:
    result = run_cli("--config", "", "--check-config", "--listen", "127.0.0.1:0 public")
    assert result.returncode == 0
    assert (
        "wsechod: warning: no listener has the role ops: /healthz and /metrics are served nowhere"
    ) in result.stderr


def test_roles_in_the_environment_and_the_config_file(tmp_path: object) -> None:
    env = clean_env(WSECHOD_LISTEN="127.0.0.1:8765 public,unix:/tmp/x.sock ops api")
    result = subprocess.run(
        [WSECHOD, "--config", "", "--check-config"],
        env=env, capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:8765 public, unix:/tmp/x.sock ops api" in result.stdout
