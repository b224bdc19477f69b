"""SIGHUP reloads the settings: what can change live applies to new connections, what
needs a restart is named and kept, an invalid file changes nothing."""

import asyncio
import dataclasses
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect as sync_connect

from tests.conftest import Daemon
from tests.test_echo import http_get
from tests.test_tls import issue, trusting
from wsechod.engine import Options
from wsechod.runtime import tls
from wsechod.runtime.lifecycle import Lifecycle
from wsechod.settings import Settings


def configured(start: Callable[..., Daemon], path: Path, text: str, *args: str) -> Daemon:
    path.write_text(text)
    return start("--config", str(path), *args)


def reload(daemon: Daemon, event: str, **fields: object) -> dict[str, object]:
    """SIGHUP, then the log event that says what it did."""
    since = len(daemon.events)
    daemon.signal(signal.SIGHUP)
    return daemon.wait_for(
        event,
        where=lambda e: (
            daemon.events.index(e) >= since and all(e.get(k) == v for k, v in fields.items())
        ),
    )


def test_live_settings_apply_to_new_connections_only(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    daemon = configured(start, path, "max_size = 1000\n")

    async def main() -> None:
        async with connect(daemon.url, max_size=None) as before:
            path.write_text("max_size = 5000\n")
            changed = await asyncio.to_thread(reload, daemon, "setting changed", key="max_size")
            assert (changed["old"], changed["new"]) == (1000, 5000)
            async with connect(daemon.url, max_size=None) as after:
                await after.send(b"x" * 3000)
                assert await after.recv() == b"x" * 3000  # the new limit
            await before.send(b"x" * 3000)
            with pytest.raises(ConnectionClosedError) as info:
                await before.recv()  # the limit it opened with
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    asyncio.run(main())


def test_settings_that_need_a_restart_are_named_and_kept(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    daemon = configured(start, path, "")
    path.write_text('mode = "relay"\nping_interval = 5\n')
    warning = reload(daemon, "setting needs a restart", key="mode")
    assert (warning["value"], warning["kept"], warning["level"]) == ("relay", "echo", "warning")
    daemon.wait_for("setting changed", where=lambda e: e["key"] == "ping_interval")
    assert http_get(daemon.port, "/healthz")[:2] == (200, "ok\n")

    async def still_echo() -> object:
        async with connect(daemon.url) as ws:
            await ws.send("still echo")
            return await ws.recv()

    assert asyncio.run(still_echo()) == "still echo"


def test_an_invalid_file_changes_nothing(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    daemon = configured(start, path, "max_connections = 1\n")
    path.write_text("max_connections = -4\n")
    error = reload(daemon, "settings not reloaded: the old ones stay")
    assert error["level"] == "error"
    assert "max_connections" in str(error["error"])

    async def second_is_refused() -> int:
        async with connect(daemon.url):
            with pytest.raises(InvalidStatus) as info:
                async with connect(daemon.url):
                    pass
            return info.value.response.status_code

    assert asyncio.run(second_is_refused()) == 503  # still the old limit of 1


def test_relay_limits_and_log_level_change_live(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    daemon = configured(start, path, "max_channel_members = 1\n", "--mode", "relay")

    async def join_two() -> None:
        async with connect(f"{daemon.url}/room"), connect(f"{daemon.url}/room"):
            pass

    with pytest.raises(InvalidStatus):
        asyncio.run(join_two())
    path.write_text('max_channel_members = 2\nlog_level = "debug"\n')
    reload(daemon, "setting changed", key="max_channel_members")
    asyncio.run(join_two())  # admitted now
    daemon.wait_for("connection open")  # a debug line: the new level is in force


def test_a_certificate_that_cannot_be_loaded_at_reload_keeps_the_tls_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files changed between the check of the settings and their loading (a renewal
    in progress): the TLS keys stay as they were, the rest applies, nothing raises."""
    reconfigured: list[Options] = []
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # the one loaded before

    class Engine:
        options = Options(tls=serving)

        def reconfigure(self, options: Options) -> None:
            reconfigured.append(options)

    def unusable(*_: object) -> None:
        raise tls.TlsError("tls_key", "/k.pem", "No such file or directory")

    monkeypatch.setattr(tls, "server_context", unusable)

    async def main() -> tuple[list[str], list[str], Settings]:
        life = Lifecycle(Settings(tls_cert="/old.pem", tls_key="/old-key.pem"))
        life.engine = Engine()  # type: ignore[assignment]
        new = dataclasses.replace(life.settings, tls_cert="/c.pem", tls_key="/k.pem", max_size=9)
        return (*life.reload(new), life.settings)

    applied, kept, settings = asyncio.run(main())
    assert (applied, kept) == (["max_size"], [])
    assert (settings.tls_cert, settings.tls_key) == ("/old.pem", "/old-key.pem")
    assert settings.max_size == 9
    assert reconfigured[-1].tls is serving and reconfigured[-1].max_size == 9


@pytest.mark.parametrize("what", ["config", "tls_cert"])
def test_a_reload_from_a_pipe_is_refused_rather_than_held(
    start: Callable[..., Daemon], tmp_path: Path, what: str
) -> None:
    """A config file or a certificate replaced by a named pipe: reading it would hold the
    server until something writes to it; the reload is refused instead, and it serves on."""
    files = issue(tmp_path)
    config = tmp_path / "wsechod.toml"
    config.write_text(f'tls_cert = "{files.cert}"\ntls_key = "{files.key}"\n')
    daemon = start("--config", str(config))
    replaced = config if what == "config" else files.cert
    replaced.unlink()
    os.mkfifo(replaced)
    daemon.signal(signal.SIGHUP)
    error = daemon.wait_for("settings not reloaded: the old ones stay")
    assert str(replaced) in error["error"] and "not a regular file" in error["error"]
    with sync_connect(f"wss://127.0.0.1:{daemon.port}/", ssl=trusting(files.ca)) as ws:
        ws.send("still served")  # with what it had
        assert ws.recv(timeout=10) == "still served"
