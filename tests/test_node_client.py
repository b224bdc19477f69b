"""Node's ws library as a client: an implementation that shares no code with ours."""

import json
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon

NODE_DIR = Path(__file__).with_name("node")
NODE = shutil.which("node")

if NODE is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
    WHY = "Node.js and tests/node/node_modules are missing: `make node-deps` installs them"
    if os.environ.get("CI"):
        pytest.fail(f"{WHY}; CI must run these tests", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {WHY}", allow_module_level=True)


def node_client(url: str, mode: str, *extra: str) -> subprocess.Popen[str]:
    assert NODE is not None
    return subprocess.Popen(
        [NODE, str(NODE_DIR / "client.mjs"), url, mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_node_ws_echoes_text_and_binary_of_every_size(start: Callable[..., Daemon]) -> None:
    daemon = start("--max-size", "65536")
    client = node_client(daemon.url + "/node", "echo", "65536")
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"ok": True, "count": 14, "extensions": ""}


def test_node_ws_with_permessage_deflate(start: Callable[..., Daemon]) -> None:
    daemon = start("--max-size", "65536", "--compression", "deflate")
    client = node_client(daemon.url, "echo", "65536", "deflate")
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert (summary["ok"], summary["count"]) == (True, 14)
    assert summary["extensions"].startswith("permessage-deflate")


def read_json_line(proc: subprocess.Popen[str], timeout: float = 10) -> Any:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError(f"no output from the Node client within {timeout} s")
    return json.loads(proc.stdout.readline())


def test_node_ws_client_gets_1001_on_sigterm(start: Callable[..., Daemon]) -> None:
    daemon = start("--drain-timeout", "5", "--log-level", "debug")
    client = node_client(daemon.url, "chatter")
    assert read_json_line(client) == {"event": "warm"}
    daemon.signal(signal.SIGTERM)
    closed = read_json_line(client)
    assert client.wait(10) == 0
    assert (closed["code"], closed["reason"]) == (1001, "server shutting down")
    assert closed["prefix"] is True  # echoes intact and in order
    assert daemon.wait(7) == 0
    # The server took in all the client sent, and all it echoed reached the client.
    server = daemon.wait_for("connection closed")
    assert (server["received"], server["sent"]) == (closed["sent"], closed["echoed"])


@pytest.mark.parametrize(
    ("query", "sent", "expected"),
    [
        ("close=4000&reason=bye&after=2", 3, {"code": 4000, "reason": "bye", "got": ["m1", "m2"]}),
        ("fragment=16&close=1000&after=1", 1, {"code": 1000, "got": ["m1"]}),
        ("drop=1&how=fin", 2, {"code": 1006, "got": ["m1"]}),  # a reset may lose m1's echo
        ("ping=0.1", 0, {"code": 1000, "pings": ["1", "2"]}),
        ("violate=utf8", 0, {"code": 1006}),
    ],
)
def test_node_ws_meets_the_test_peers_controls(
    start: Callable[..., Daemon], query: str, sent: int, expected: dict[str, Any]
) -> None:
    """A second client implementation sees what the controls promise: the close code and
    reason after N messages, fragments put together, a dropped connection (1006), the
    server's numbered pings, and an invalid UTF-8 message it must fail on."""
    daemon = start("--controls")
    client = node_client(f"{daemon.url}/?{query}", "peer", str(sent))
    out, err = client.communicate(timeout=30)
    summary = json.loads(out.splitlines()[-1])
    assert {k: summary[k] for k in expected} == expected, (summary, err)
    if query.startswith("violate"):
        assert any("UTF-8" in e for e in summary["errors"]), summary
