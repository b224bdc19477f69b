"""Presence through the HTTP API (GET /channels, GET /channels/<name>): counts and subs
across two instances sharing a real Redis, paging, and an instance killed with SIGKILL."""

import asyncio
import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Daemon
from tests.credentials import KEY, SECRET, bearer, token
from tests.redisd import RedisServer

INTERVAL = 0.5  # presence_interval here: a dead instance is gone within 3 x this


def get(port: int, path: str, key: str | None = KEY) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-API-Key": key} if key else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def until(
    port: int, path: str, want: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """Poll until the document satisfies ``want`` (presence is eventually consistent)."""
    deadline = time.monotonic() + timeout
    while True:
        status, document = get(port, path)
        assert status == 200, document
        if want(document):
            return document
        assert time.monotonic() < deadline, document
        time.sleep(0.05)


def counts(document: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["members"] for c in document["channels"]}


@pytest.mark.timeout(90)
def test_presence_counts_and_subs_across_instances_and_a_killed_one(
    start: Callable[..., Daemon],
    key_file: Path,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    args = (
        "--mode", "relay", "--broker", redis_server.url, "--api-key-file", str(key_file),
        "--auth", "jwt", "--jwt-secret-file", str(secret),
        "--presence-interval", str(INTERVAL),
    )  # fmt: skip
    one, two = start(*args), start(*args)

    def member(daemon: Daemon, channel: str, sub: str) -> Any:
        return connect(
            f"{daemon.url}{channel}", additional_headers=bearer(token(sub, subscribe=["/**"]))
        )

    async def main() -> None:
        conns: list[ClientConnection] = []
        for daemon, channel, sub in [
            (one, "/a", "alice"), (one, "/a", "alice"), (one, "/a", "bob"),
            (two, "/a", "carol"), (two, "/b", "dave"), (two, "/b", "erin"),
        ]:  # fmt: skip
            conns.append(await member(daemon, channel, sub))
        everything = await asyncio.to_thread(
            until, one.port, "/channels", lambda d: counts(d) == {"/a": 4, "/b": 2}
        )
        assert everything["next"] is None
        status, first = await asyncio.to_thread(get, two.port, "/channels?limit=1")
        assert (status, counts(first), first["next"]) == (200, {"/a": 4}, "/a")
        _, second = await asyncio.to_thread(get, two.port, "/channels?limit=1&after=/a")
        assert (counts(second), second["next"]) == ({"/b": 2}, None)
        _, a = await asyncio.to_thread(get, two.port, "/channels/a")
        assert a["members"] == 4
        assert a["anonymous"] == 0
        assert a["subs"] == [
            {"sub": "alice", "connections": 2},
            {"sub": "bob", "connections": 1},
            {"sub": "carol", "connections": 1},
        ]
        await conns[2].close()  # bob leaves: seen within a write
        await asyncio.to_thread(
            until,
            two.port,
            "/channels/a",
            lambda d: [s["sub"] for s in d["subs"]] == ["alice", "carol"],
        )
        killed = time.monotonic()
        two.kill()  # SIGKILL: nothing is cleaned up by it
        await asyncio.to_thread(until, one.port, "/channels", lambda d: counts(d) == {"/a": 2})
        gone = time.monotonic() - killed
        assert gone < 3 * INTERVAL + 3, gone  # its entries expire after 3 intervals
        for conn in conns:
            await conn.close()
        await asyncio.to_thread(until, one.port, "/channels", lambda d: counts(d) == {})

    asyncio.run(main())


def test_presence_needs_an_api_key_and_pages_within_bounds(
    start: Callable[..., Daemon],
    key_file: Path,
) -> None:
    daemon = start("--mode", "relay", "--api-key-file", str(key_file))  # the memory broker

    async def main() -> None:
        async with connect(f"{daemon.url}/solo"):
            document = await asyncio.to_thread(
                until, daemon.port, "/channels", lambda d: counts(d) == {"/solo": 1}
            )
            assert document["next"] is None
            _, solo = await asyncio.to_thread(get, daemon.port, "/channels/solo")
            assert (solo["members"], solo["anonymous"], solo["subs"]) == (1, 1, [])

    asyncio.run(main())
    status, document = get(daemon.port, "/channels", key=None)
    assert (status, document["error"]) == (
        401,
        "unauthorized: presence needs an API key (X-API-Key)",
    )
    for limit in ("5000", "%D9%A3", "9" * 5000):  # too many, an Arabic-Indic 3, huge
        status, document = get(daemon.port, f"/channels?limit={limit}")
        assert (status, document["error"]) == (400, "limit: a whole number from 1 to 1000")
    assert get(daemon.port, "/channels/nobody")[1]["members"] == 0  # any name is valid
