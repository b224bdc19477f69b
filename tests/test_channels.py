"""Channel patterns and [[channel]] policies: the matcher that token rights, policies and
history share, in process; then the tables at work in a real relay."""

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import Daemon, clean_env, run_cli
from wsechod.channels import InvalidPattern, Pattern, Patterns, Policies, Policy, Rule, rules

SEGMENT = st.text(alphabet="abcxyz019-._~", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")  # dot-segments name no segment once normalised
)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("/rooms/*", ["/rooms/1", "/rooms/%72"], ["/rooms", "/rooms/", "/rooms/1/x", "/room/1"]),
        ("/rooms/**", ["/rooms/1", "/rooms/1/2/3", "/rooms/a/"], ["/rooms", "/rooms/", "/x/1"]),
        ("/**", ["/a", "/a/b"], ["/"]),
        ("/", ["/"], ["/a"]),
        ("/*/chat", ["/a/chat"], ["/a/b/chat", "/chat"]),
        ("/%72oom", ["/room"], ["/Room"]),
    ],
)
def test_patterns_match_segment_by_segment(pattern: str, yes: list[str], no: list[str]) -> None:
    compiled = Pattern(pattern)
    assert [c for c in yes if not compiled.matches(c)] == []
    assert [c for c in no if compiled.matches(c)] == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("rooms", "starts with '/'"),
        ("/room*", "'*' is a whole segment or none"),
        ("/**/x", "'**' may only be the last segment"),
        ("/a?b=1", "no query string"),
        ("/%zz", "not followed by two hexadecimal digits"),
        ("/" + "a" * 300, "at most 256"),
    ],
)
def test_bad_patterns_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidPattern, match=why.replace("*", r"\*").replace("?", r"\?")):
        Pattern(text)


@pytest.mark.unit
@given(st.lists(SEGMENT, min_size=1, max_size=5))
def test_a_pattern_without_wildcards_matches_its_own_name_only(segments: list[str]) -> None:
    name = "/" + "/".join(segments)
    assert Pattern(name).matches(name)
    assert Patterns([name]).matches(name)
    assert not Pattern(name).matches(name + "/x")
    assert Pattern("/" + "/".join(["*"] * len(segments))).matches(name)
    assert Pattern("/**").matches(name)


@pytest.mark.unit
def test_the_first_matching_table_applies_over_the_global_settings() -> None:
    default = Policy(False, "drop", 2.0, 1000, "members", 0, 0.0)
    policies = Policies(
        rules(
            [
                {"pattern": "/news/**", "publish": "api"},
                {"pattern": "/news/sports", "relay_echo": True},
                {"pattern": "/rooms/*", "max_channel_members": 5, "slow_consumer": "close"},
            ]
        ),
        default,
    )
    assert policies.of("/news/sports") == Policy(False, "drop", 2.0, 1000, "api", 0, 0.0)
    assert policies.of("/rooms/1") == Policy(False, "close", 2.0, 5, "members", 0, 0.0)
    assert policies.of("/elsewhere") is default


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tables", "why"),
    [
        ([{"relay_echo": True}], "[[channel]] number 1: no pattern"),
        ([{"pattern": "/a"}, {"pattern": "/b", "echo": True}], "number 2: unknown key 'echo'"),
        ([{"pattern": "/a", "publish": "everyone"}], "expected members or api"),
        ([{"pattern": "/a", "max_channel_members": "5"}], "expected int"),
        ([{"pattern": "/a", "max_channel_members": 0}], "too small"),
        ([{"pattern": "a"}], "starts with '/'"),
    ],
)
def test_bad_tables_name_the_table_and_the_key(tables: list[dict[str, object]], why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        rules(tables)
    assert rules([Rule("/a")]) == (Rule("/a"),)  # handed down from the main process: as is


# --- In a real relay -----------------------------------------------------------------------

TABLES = """
mode = "relay"

[[channel]]
pattern = "/announcements/**"
publish = "api"

[[channel]]
pattern = "/rooms/*"
relay_echo = true
max_channel_members = 2
"""


def test_tables_set_echo_members_and_who_publishes(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text(TABLES)
    daemon = start("--config", str(config))

    async def main() -> tuple[str, str, int, tuple[int, str]]:
        async with connect(f"{daemon.url}/rooms/1") as a, connect(f"{daemon.url}/rooms/1"):
            await a.send("mine")
            echoed = str(await asyncio.wait_for(a.recv(), 10))  # relay_echo here only
            with pytest.raises(InvalidStatus) as full:
                await connect(f"{daemon.url}/rooms/1")
        async with connect(f"{daemon.url}/lobby") as b, connect(f"{daemon.url}/lobby") as c:
            await b.send("hello")
            heard = str(await asyncio.wait_for(c.recv(), 10))
            await b.send("again")
            assert await asyncio.wait_for(c.recv(), 10) == "again"  # b never hears itself
        async with connect(f"{daemon.url}/announcements/today") as reader:
            await reader.send("may I?")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(reader.recv(), 10)
        assert closed.value.rcvd is not None
        status = full.value.response.status_code
        return echoed, heard, status, (closed.value.rcvd.code, closed.value.rcvd.reason)

    echoed, heard, status, close = asyncio.run(main())
    assert (echoed, heard, status) == ("mine", "hello", 503)
    assert close == (1008, "read-only member: no right to publish on this channel")


def test_a_reload_changes_the_policy_of_open_channels(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = tmp_path / "wsechod.toml"
    config.write_text('mode = "relay"\n')
    daemon = start("--config", str(config))

    async def main() -> str:
        async with connect(f"{daemon.url}/rooms/9") as ws:
            config.write_text(
                'mode = "relay"\n[[channel]]\npattern = "/rooms/*"\nrelay_echo = true\n'
            )
            since = len(daemon.events)
            daemon.signal(signal.SIGHUP)
            await asyncio.to_thread(
                daemon.wait_for, "setting changed", where=lambda e: daemon.events.index(e) >= since
            )
            await ws.send("back to me")
            return str(await asyncio.wait_for(ws.recv(), 10))

    assert asyncio.run(main()) == "back to me"


def test_tables_come_from_the_config_file_only(tmp_path: Path) -> None:
    result = run_cli("--check-config", env=clean_env(WSECHOD_CHANNEL="/x"))
    assert result.returncode == 2
    assert result.stderr == (
        "wsechod: error: invalid channel (from WSECHOD_CHANNEL): set in the config file "
        "only, as [[channel]] tables\n"
    )
    config = tmp_path / "bad.toml"
    config.write_text('[[channel]]\npattern = "/a"\npublish = "all"\n')
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"invalid channel (from {config}): [[channel]] number 1" in result.stderr
    config.write_text(TABLES)
    result = run_cli("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    assert '"pattern": "/announcements/**"' in result.stdout
