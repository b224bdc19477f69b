"""The pytest plugin, as a user meets it: a test module in a directory of its own, run by
a real ``python -m pytest``, with the fixtures coming from the installed entry point."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env

EMBED = Path(__file__).parents[1] / "docs" / "embed.md"


def readme_example(first_line: str = "# test_client.py") -> str:
    """An example of the docs' "Embed and pytest" page: by default, the complete test
    module of its "pytest fixtures"."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", EMBED.read_text(), re.DOTALL)
    return next(b for b in blocks if b.startswith(first_line))


def pytest_run(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(90)
def test_the_docs_example_passes(tmp_path: Path) -> None:
    (tmp_path / "test_client.py").write_text(readme_example())
    run = pytest_run(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout
    # The fixtures are the plugin's: without it, they do not exist.
    without = pytest_run(tmp_path, "-p", "no:wsechod")
    assert without.returncode == 1 and "fixture 'wsechod_server' not found" in without.stdout


TEARDOWN = """
import threading

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

servers = []


def test_fixtures(wsechod_server, wsechod_relay, wsechod_factory):
    custom = wsechod_factory(max_size=10, relay_echo=True, mode="relay")
    servers.extend([wsechod_server, wsechod_relay, custom])
    assert [s.settings.mode for s in servers] == ["echo", "relay", "relay"]
    assert (custom.settings.max_size, custom.settings.drain_timeout) == (10, 2.0)
    assert len({s.port for s in servers}) == 3
    assert all(s.url == f"ws://127.0.0.1:{s.port}" for s in servers)
    ws = connect(wsechod_server.url).__enter__()  # left open: teardown closes it
    ws.send("still here")
    assert ws.recv(timeout=5) == "still here"
    servers.append(ws)


def test_teardown_stopped_them():
    *stopped, ws = servers
    assert all(not s.thread.is_alive() and s.report is not None for s in stopped)
    assert stopped[0].report.connections == 1
    # The client's own thread may still be reading the end of the connection: wait for it.
    with pytest.raises(ConnectionClosedOK) as closed:
        ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert not [t for t in threading.enumerate() if t.name.startswith("wsechod")]
"""


@pytest.mark.timeout(90)
def test_fixtures_give_servers_and_stop_them_at_teardown(tmp_path: Path) -> None:
    (tmp_path / "test_teardown.py").write_text(TEARDOWN)
    run = pytest_run(tmp_path, "-W", "ignore::DeprecationWarning")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


@pytest.mark.timeout(30)
def test_the_docs_embedding_example_runs() -> None:
    code = readme_example("import wsechod\n")
    run = subprocess.run(
        [sys.executable, "-c", code + "\nprint(server.report)"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DrainReport(connections=0, force_closed=0")
