"""The docs' browser client (docs/examples/browser.html) in a real headless Chromium,
against a relay behind tokens: what the Relay rights page promises a browser, checked
where a browser's rules apply (subprotocol selection, what a refused handshake shows)."""

import asyncio
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import connect

from tests import chromium
from tests.conftest import Daemon
from tests.credentials import KEY, bearer, token
from tests.test_api import post

chromium.needed()

PAGE = Path(__file__).parents[1] / "docs" / "examples" / "browser.html"


def page_url(daemon: Daemon, channel: str, value: str) -> str:
    return f"{PAGE.as_uri()}?{urlencode({'url': daemon.url + channel, 'token': value})}"


def relay(start: Callable[..., Daemon], secret_file: Path, *args: str) -> Daemon:
    return start("--mode", "relay", "--auth", "jwt", "--jwt-secret-file", str(secret_file), *args)


def test_a_browser_joins_with_its_token_publishes_and_hears_the_backend(
    start: Callable[..., Daemon], secret_file: Path, key_file: Path
) -> None:
    daemon = relay(start, secret_file, "--api-key-file", str(key_file))
    reader = bearer(token("bob", subscribe=["/rooms/*"]))  # read-only
    alice = token("alice", subscribe=["/rooms/*"], publish=["/rooms/42"])

    async def main(tab: str) -> None:
        async with (
            connect(f"{daemon.url}/rooms/42", additional_headers=reader) as bob,
            chromium.page(tab, page_url(daemon, "/rooms/42", alice)) as page,
        ):
            await page.wait_for("#log", "open, subprotocol wsechod.auth")
            assert await asyncio.wait_for(bob.recv(), 20) == "hello from the browser"
            status, answer, _ = await asyncio.to_thread(
                post, daemon.port, "/publish/rooms/42", b"the meeting starts",
                {"X-API-Key": KEY, "Content-Type": "text/plain"},
            )  # fmt: skip
            assert status == 202 and answer["delivered_here"] == 2, answer
            shown = await page.wait_for("#log", "message: the meeting starts")
            assert "closed" not in shown
            assert await asyncio.wait_for(bob.recv(), 20) == "the meeting starts"

    with chromium.browser() as tab:
        asyncio.run(main(tab))


@pytest.mark.parametrize(
    ("refusal", "shown"),
    [
        # Opened by the server (the browser sees an open), closed at once with the reason.
        ("close", "open, subprotocol wsechod.auth\nclosed: 4401 unauthorized: token expired\n"),
        ("status", "closed: 1006 \n"),  # the 401 is lost on the script
    ],
)
def test_a_browser_reads_a_refusal_only_as_a_close(
    start: Callable[..., Daemon], secret_file: Path, refusal: str, shown: str
) -> None:
    daemon = relay(start, secret_file, "--auth-refusal", refusal)
    expired = token(subscribe=["/rooms/*"], ttl=-60)

    async def main(tab: str) -> None:
        async with chromium.page(tab, page_url(daemon, "/rooms/42", expired)) as page:
            assert await page.wait_for("#log", "closed: ") == shown

    with chromium.browser() as tab:
        asyncio.run(main(tab))
