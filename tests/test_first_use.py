"""Small things a new user tripped on: what --help says wsechod is, and which listeners the
``listening`` event says speak TLS. (The embedded settings errors in Python's terms are in
test_embedded.py, the README's and the docs' commands in test_readme.py, packaging in
test_packaging.py.)"""

import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, run_cli
from tests.test_tls import issue, tls_daemon


def test_help_says_echo_and_relay() -> None:
    """It said "WebSocket echo server daemon" only, though --mode relay is half of it."""
    out = " ".join(run_cli("--help").stdout.split())
    assert "WebSocket echo and relay server daemon." in out


def test_listening_says_which_addresses_speak_tls(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    socket_path = tmp_path / "ws.sock"
    where = ("--listen", "127.0.0.1:0", "--listen", f"unix:{socket_path}")
    first = start(*where)
    plain = first.wait_for("listening")
    assert plain["tls"] == []
    assert plain["addresses"][1] == str(socket_path)  # unchanged: users parse it
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0  # and its socket file is gone
    tls = tls_daemon(start, issue(tmp_path / "tls"), *where).wait_for("listening")
    assert tls["tls"] == tls["addresses"]
    assert tls["addresses"][0].startswith("127.0.0.1:")
    assert tls["addresses"][1] == str(socket_path)
