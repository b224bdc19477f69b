"""wsechod embedded in a program: serve_in_thread and running.

These run the server inside the test process (that is the point): real sockets and real
clients, and what the host program owns (signal handlers, logging, threads, file
descriptors) checked before and after.
"""

import ast
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import structlog
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import wsechod
from tests import rawws
from tests.conftest import clean_env, run_cli
from tests.test_tls import issue, trusting
from wsechod import log as wlog

PACKAGE = Path(wsechod.__file__).parent


class Collect(logging.Handler):
    """The records a host's handler receives."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def event(self, name: str) -> logging.LogRecord:
        return next(r for r in self.records if r.getMessage() == name)


@contextlib.contextmanager
def host_handler(level: int = logging.INFO) -> Iterator[Collect]:
    """A handler on the ``wsechod`` logger, as a host configures it."""
    logger = logging.getLogger("wsechod")
    handler, before = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def open_loops() -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()
    )


def closed_with(client: Any) -> int | None:
    """The close code a websockets client received, once the server closed it."""
    try:
        client.recv(timeout=10)
    except ConnectionClosed as closed:
        return None if closed.rcvd is None else closed.rcvd.code
    raise AssertionError("not closed")


@pytest.mark.timeout(30)
def test_start_and_stop_50_times_leaks_nothing() -> None:
    with wsechod.serve_in_thread():  # the first start imports the engine: not counted
        pass
    # Garbage of earlier tests collected first: in a whole suite its sockets would close
    # during the loop below. What the suite's other threads close meanwhile is not ours
    # either: nothing new, and no more than before, is the check.
    loops = open_loops()
    threads, fds = set(threading.enumerate()), open_fds()
    started = time.monotonic()
    for _ in range(50):
        with wsechod.serve_in_thread(port=0) as server, connect(server.url) as client:
            client.send("ping")
            assert client.recv(timeout=5) == "ping"
        assert not server.thread.is_alive()
    elapsed = time.monotonic() - started
    assert set(threading.enumerate()) - threads == set()
    after = open_fds()
    assert (after - fds, len(after) <= len(fds)) == (set(), True)
    assert open_loops() == loops
    # None waited for a deadline (a drain_timeout of 10 s would show, even when loaded).
    assert elapsed < 45, f"50 starts and stops took {elapsed:.1f} s"


@pytest.mark.timeout(30)
def test_stop_from_another_thread_sends_1001_and_joins_within_drain_timeout() -> None:
    drain_timeout = 1.5
    server = wsechod.serve_in_thread(port=0, drain_timeout=drain_timeout, close_timeout=60)
    exits = contextlib.ExitStack()
    clients = [exits.enter_context(connect(server.url)) for _ in range(3)]
    for i, client in enumerate(clients):
        client.send(f"hello {i}")
        assert client.recv(timeout=5) == f"hello {i}"
    stubborn = rawws.connect(server.port)  # never answers the close: only the deadline ends it
    rawws.send_frame(stubborn, rawws.OP_TEXT, b"hi")
    assert rawws.read_frame(stubborn) == (rawws.OP_TEXT, b"hi")

    stopped: list[float] = []

    def stop() -> None:
        begin = time.monotonic()
        server.stop()
        stopped.append(time.monotonic() - begin)

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert [closed_with(c) for c in clients] == [1001, 1001, 1001]
    assert rawws.read_close(stubborn) == (1001, "server shutting down")
    stopper.join(drain_timeout + 5)
    assert not server.thread.is_alive()
    assert drain_timeout <= stopped[0] < drain_timeout + 1.5
    assert server.report is not None
    assert (server.report.connections, server.report.force_closed) == (4, 1)
    stubborn.close()
    exits.close()


@pytest.mark.timeout(30)
def test_host_signal_handlers_and_logging_are_left_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def host_handler_fn(signum: int, frame: FrameType | None) -> None:
        """The host program's own handler."""

    previous = {sig: signal.signal(sig, host_handler_fn) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    try:
        handlers, level = list(root.handlers), root.level
        loggers = {name: (lg.level, list(lg.handlers)) for name, lg in _loggers()}
        config = structlog.get_config()
        with host_handler() as seen:
            with wsechod.serve_in_thread(port=0) as server, connect(server.url) as client:
                client.send("x")
                assert client.recv(timeout=5) == "x"
            asyncio.run(_serve_once())
        assert {sig: signal.getsignal(sig) for sig in previous} == dict.fromkeys(
            previous, host_handler_fn
        )
        assert (list(root.handlers), root.level) == (handlers, level)
        after = {name: (lg.level, list(lg.handlers)) for name, lg in _loggers()}
        assert {name: after[name] for name in loggers} == loggers
        assert structlog.get_config() == config
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The library's events reached the host's handler, with their fields on the record.
    listening = seen.event("listening")
    assert (listening.name, listening.levelno) == ("wsechod", logging.INFO)
    assert wlog.fields(listening)["addresses"] == server.addresses
    assert seen.event("stop requested").reason == "stop()"  # type: ignore[attr-defined]
    assert seen.event("drained").connections_opened == 1  # type: ignore[attr-defined]
    # And nothing of it went to stdout (structlog's default) or stderr.
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")


def _loggers() -> list[tuple[str, logging.Logger]]:
    return [
        (name, lg)
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    ]


async def _serve_once() -> None:
    async with wsechod.running(port=0) as server, async_connect(server.url) as client:
        await client.send("y")
        assert await client.recv() == "y"


@pytest.mark.timeout(30)
def test_caplog_sees_events_on_the_wsechod_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="wsechod")
    with wsechod.serve_in_thread(port=0) as server, connect(server.url + "/room") as client:
        client.send("x")
        client.recv(timeout=5)
    opened = next(r for r in caplog.records if r.getMessage() == "connection open")
    assert (opened.name, opened.levelname) == ("wsechod.engine", "DEBUG")
    assert opened.path == "/room"  # type: ignore[attr-defined]
    assert {"listening", "stop requested", "drained"} <= {r.getMessage() for r in caplog.records}


@pytest.mark.unit
def test_a_field_named_like_a_record_attribute_is_renamed_not_a_crash() -> None:
    with host_handler(logging.DEBUG) as seen:
        wlog.get_logger("wsechod.test").info("counted", name="n", module="m", count=1)
    record = seen.event("counted")
    assert wlog.fields(record) == {"name_": "n", "module_": "m", "count": 1}
    assert record.name == "wsechod.test"


@pytest.mark.unit
def test_no_log_call_uses_a_record_attribute_as_a_field() -> None:
    """logging raises KeyError on such an ``extra``: check every call in the package."""
    clashes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("debug", "info", "warning", "error", "exception"):
                continue
            for keyword in node.keywords:
                if keyword.arg in wlog.RECORD_ATTRIBUTES - wlog.PASSED_TO_LOGGING:
                    clashes.append(f"{path.name}:{node.lineno} {keyword.arg}")
    assert clashes == []
    assert "module" in wlog.RECORD_ATTRIBUTES and "message" in wlog.RECORD_ATTRIBUTES


@pytest.mark.timeout(30)
def test_port_in_use_raises_in_the_caller_with_the_commands_line() -> None:
    threads = set(threading.enumerate())
    with wsechod.serve_in_thread(port=0) as server:
        with pytest.raises(wsechod.BindError) as caught:
            wsechod.serve_in_thread(port=server.port)
        assert (
            str(caught.value) == f"cannot listen on 127.0.0.1:{server.port}: Address already in use"
        )
        # The command prints the very same line.
        cli = run_cli("--config", "", "--port", str(server.port))
        assert (cli.returncode, cli.stderr) == (1, f"wsechod: error: {caught.value}\n")
    assert set(threading.enumerate()) == threads


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"port": -1}, "invalid port -1 (from serve_in_thread()): must be between 0 and 65535"),
        (  # advice in Python's terms, not the config file's (TOML: write 64 without quotes)
            {"max_size": "64"},
            "invalid max_size '64' (from serve_in_thread()): expected int, got str "
            "(in Python: max_size=64, without quotes)",
        ),
        (
            {"allowed_origins": "https://a.example"},
            "invalid allowed_origins 'https://a.example' (from serve_in_thread()): expected a "
            "list of strings (in Python: allowed_origins=['https://a.example'])",
        ),
        (
            {"mode": "mirror"},
            "invalid mode 'mirror' (from serve_in_thread()): must be one of echo, relay",
        ),
        ({"prot": 0}, "unknown key 'prot' passed to serve_in_thread() (did you mean 'port'?)"),
        (
            {"tls_cert": "/nonexistent/cert.pem"},
            "invalid tls_cert '/nonexistent/cert.pem' (from serve_in_thread()): ",
        ),
        (
            {"daemon": True},
            "invalid daemon True (from serve_in_thread()): an embedded server runs in its "
            "program's process",
        ),
        ({"log_level": "debug"}, "invalid log_level 'debug' (from serve_in_thread()): "),
        (
            {"workers": 4},  # it used to be accepted and quietly ignored
            "invalid workers 4 (from serve_in_thread()): an embedded server is one event loop",
        ),
    ],
)
def test_a_bad_setting_raises_in_the_caller_with_one_line(
    settings: dict[str, Any], message: str
) -> None:
    threads = set(threading.enumerate())
    with pytest.raises(wsechod.SettingsError) as caught:
        wsechod.serve_in_thread(**settings)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert set(threading.enumerate()) == threads


def test_a_bad_setting_has_the_config_files_message(tmp_path: Path) -> None:
    """The same check as the file's: only the source differs."""
    config = tmp_path / "wsechod.toml"
    config.write_text("max_size = 0\n")
    with pytest.raises(wsechod.SettingsError) as from_file:
        wsechod.serve_in_thread(config=config)
    with pytest.raises(wsechod.SettingsError) as from_argument:
        wsechod.serve_in_thread(max_size=0)
    assert (
        str(from_file.value)
        == f"invalid max_size 0 (from {config}): must be between 1 and 1073741824"
    )
    assert str(from_argument.value) == str(from_file.value).replace(
        str(config), "serve_in_thread()"
    )


@pytest.mark.timeout(30)
def test_environment_and_config_file_are_read_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text("max_size = 1000\nwrite_limit = 2000\ndaemon = true\n")
    monkeypatch.setenv("WSECHOD_MAX_SIZE", "3000")
    monkeypatch.setenv("WSECHOD_CONFIG", str(config))
    monkeypatch.setenv("WSECHOD_PORT", "not a port")  # would fail if it were read
    with wsechod.serve_in_thread(port=0) as server:
        assert (server.settings.max_size, server.settings.write_limit) == (2**20, 2**15)
    with host_handler() as seen, wsechod.serve_in_thread(port=0, config=config) as server:
        assert (server.settings.max_size, server.settings.write_limit) == (1000, 2000)
    # A config file shared with the command may set its keys: ignored, with a warning.
    ignored = seen.event("settings have no effect when embedded")
    assert (ignored.levelno, ignored.keys) == (logging.WARNING, ["daemon"])  # type: ignore[attr-defined]
    environ = clean_env(WSECHOD_MAX_SIZE="3000", WSECHOD_CONFIG=str(config))
    with wsechod.serve_in_thread(port=0, environ=environ) as server:
        assert (server.settings.max_size, server.settings.write_limit) == (3000, 2000)
    with wsechod.serve_in_thread(port=0, environ=environ, max_size=4000) as server:
        assert (server.settings.max_size, server.settings.write_limit) == (4000, 2000)


@pytest.mark.timeout(30)
def test_running_inside_asyncio_run() -> None:
    async def main() -> tuple[Any, set[asyncio.Task[Any]], set[asyncio.Task[Any]], int]:
        before = asyncio.all_tasks()
        async with wsechod.running(port=0, mode="relay") as server:
            during = asyncio.all_tasks() - before
            async with (
                async_connect(server.url + "/room") as a,
                async_connect(server.url + "/room") as b,
            ):
                await a.send("to b")
                assert await b.recv() == "to b"
                server.request_stop()  # early: leaving the block waits for the drain
                with pytest.raises(ConnectionClosed) as closed:
                    await a.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        return server.report, during, asyncio.all_tasks() - before, server.port

    report, during, after, port = asyncio.run(main())
    assert report is not None and (report.connections, report.force_closed) == (2, 0)
    # The server's one task (none per connection), gone once the block is left.
    assert [t.get_name() for t in during] == [f"<wsechod relay server on 127.0.0.1:{port}>"]
    assert not [t for t in after if t.get_name().startswith("<wsechod")]


@pytest.mark.timeout(30)
def test_running_raises_a_start_error_in_the_caller() -> None:
    async def main(port: int) -> None:
        async with wsechod.running(port=port):
            raise AssertionError("started twice on one port")

    with wsechod.serve_in_thread(port=0) as server, pytest.raises(wsechod.BindError):
        asyncio.run(main(server.port))


@pytest.mark.timeout(30)
def test_unix_socket_listener_is_served_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "ws.sock"
    with wsechod.serve_in_thread(listen=[f"unix:{path}", "127.0.0.1:0"]) as server:
        assert server.addresses[0] == str(path)
        assert server.url == f"ws://127.0.0.1:{server.port}"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert not path.exists()
    with wsechod.serve_in_thread(listen=[f"unix:{path}"]) as server, pytest.raises(ValueError):
        server.url  # noqa: B018


@pytest.mark.timeout(30)
def test_url_of_every_interface_is_the_loopback() -> None:
    with wsechod.serve_in_thread(host="", port=0) as server:
        assert server.host in ("0.0.0.0", "::")
        assert server.url in (f"ws://127.0.0.1:{server.port}", f"ws://[::1]:{server.port}")
        with connect(server.url) as client:
            client.send("x")
            assert client.recv(timeout=5) == "x"


@pytest.mark.timeout(30)
def test_stop_after_request_stop_waits_for_the_drain_rather_than_cut_it() -> None:
    server = wsechod.serve_in_thread(port=0, drain_timeout=0.5, close_timeout=60)
    with rawws.connect(server.port):  # never answers the close: held until the deadline
        server.request_stop()
        begin = time.monotonic()
        report = server.stop()
        elapsed = time.monotonic() - begin
    assert report is not None and report.force_closed == 1
    assert 0.5 <= elapsed < 30  # the drain's deadline, not close_timeout's (60 s)


@pytest.mark.timeout(30)
def test_leaving_running_after_request_stop_waits_for_the_drain() -> None:
    async def main() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        async with wsechod.running(port=0, drain_timeout=0.5, close_timeout=60) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(rawws.handshake_request(server.port))
            await reader.readuntil(b"\r\n\r\n")  # upgraded; it will never answer a close
            server.request_stop()
            begin = loop.time()
        elapsed = loop.time() - begin
        writer.close()
        return server.report, elapsed

    report, elapsed = asyncio.run(main())
    assert report is not None and report.force_closed == 1
    assert 0.5 <= elapsed < 30  # the drain's deadline, not close_timeout's (60 s)


@pytest.mark.timeout(30)
def test_tls_server_url_is_wss(tmp_path: Path) -> None:
    files = issue(tmp_path)
    with wsechod.serve_in_thread(
        port=0, tls_cert=str(files.cert), tls_key=str(files.key)
    ) as server:
        assert server.url == f"wss://127.0.0.1:{server.port}"
        with connect(server.url, ssl=trusting(files.ca)) as client:
            client.send("secret")
            assert client.recv(timeout=5) == "secret"
    files.key.write_text("not a key")
    with pytest.raises(
        wsechod.SettingsError, match=r"^invalid tls_key '.*' \(from serve_in_thread\(\)\)"
    ):
        wsechod.serve_in_thread(port=0, tls_cert=str(files.cert), tls_key=str(files.key))
