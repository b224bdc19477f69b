"""pytest fixtures: a real wsechod server per test, for testing WebSocket clients.

Installed with wsechod (entry point ``pytest11``), so a test only names a fixture:

- ``wsechod_server``: an echo server, with the test peer's controls on
  (``wsechod_server.url(close=4000, after=2)``: the URL of a connection that is closed
  with 4000 after two messages; see the Test peer page);
- ``wsechod_relay``: a relay server (channels by path, in-process broker);
- ``wsechod_factory``: ``wsechod_factory(**settings)`` starts one with any settings
  (keys of the config file), as many as the test likes.

Each yields a ``wsechod.ThreadedServer`` (``.url``, ``.port``, ``.addresses``, ...)
listening on a free port of 127.0.0.1, and stops it at teardown: clients still connected
get 1001, and teardown waits at most ``drain_timeout``, which is 2 seconds here unless
given (a test that forgets a client does not wait 10). wsechod itself is imported only
when a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from wsechod.runtime.embedded import ThreadedServer

# What the fixtures change from wsechod's defaults.
DEFAULTS: dict[str, Any] = {"port": 0, "drain_timeout": 2.0}


@pytest.fixture
def wsechod_factory() -> Iterator[Callable[..., ThreadedServer]]:
    """``wsechod_factory(**settings)`` starts a server (``serve_in_thread``) and returns
    it once it listens; every server it started is stopped at teardown."""
    from wsechod.runtime.embedded import serve_in_thread  # noqa: PLC0415 (only when used)

    servers: list[ThreadedServer] = []

    def start(**settings: Any) -> ThreadedServer:
        echo = settings.get("mode", "echo") == "echo"  # the test peer's controls: echo's
        server = serve_in_thread(**(DEFAULTS | {"controls": echo} | settings))
        servers.append(server)
        return server

    yield start
    errors: list[BaseException] = []
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as exc:  # stop the others anyway, then say what failed
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def wsechod_server(wsechod_factory: Callable[..., ThreadedServer]) -> ThreadedServer:
    """An echo server: every message comes back to its sender."""
    return wsechod_factory()


@pytest.fixture
def wsechod_relay(wsechod_factory: Callable[..., ThreadedServer]) -> ThreadedServer:
    """A relay server: a message goes to every other client on the same path."""
    return wsechod_factory(mode="relay")
