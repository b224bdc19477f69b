"""Node's ws library as a client: an implementation that shares no code with ours."""

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon

NODE_DIR = Path(__file__).with_name("node")
NODE = shutil.which("node")

if NODE is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
    pytest.fail(
        "Node.js and tests/node/node_modules are needed: run `make node-deps` (make test does)",
        pytrace=False,
    )


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
    assert json.loads(out.splitlines()[-1]) == {"ok": True, "count": 14}


def test_node_ws_client_gets_1001_on_sigterm(start: Callable[..., Daemon]) -> None:
    daemon = start("--drain-timeout", "5")
    client = node_client(daemon.url, "chatter")
    assert client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"event": "warm"}
    daemon.signal(signal.SIGTERM)
    closed = json.loads(client.stdout.readline())
    assert client.wait(10) == 0
    assert (closed["code"], closed["reason"]) == (1001, "server shutting down")
    assert closed["prefix"] is True
    assert closed["sent"] - closed["echoed"] <= 1  # ping-pong: at most one in flight
    assert daemon.wait(7) == 0
