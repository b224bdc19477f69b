"""The console page (``--console``) in a real headless Chromium: loaded from the server,
connect with a control, send, read the echo from the page, close with a code; its policy
lets nothing else run; off, /console is a 404."""

import asyncio
import json
from collections.abc import Callable

from tests import chromium
from tests.conftest import Daemon
from tests.test_echo import http_get
from tests.test_peer import upgrade

chromium.needed()


async def fill(page: chromium.Page, **fields: str) -> None:
    for name, value in fields.items():
        script = f"document.getElementById({json.dumps(name)}).value = {json.dumps(value)}"
        await page.call("Runtime.evaluate", expression=script)


async def click(page: chromium.Page, button: str) -> None:
    script = f"document.getElementById({json.dumps(button)}).click()"
    await page.call("Runtime.evaluate", expression=script)


def test_the_console_connects_sends_and_closes_with_a_code(start: Callable[..., Daemon]) -> None:
    daemon = start("--console", "--controls")

    async def main(tab: str) -> None:
        async with chromium.page(tab, f"http://127.0.0.1:{daemon.port}/console") as page:
            await page.wait_for("h1", "wsechod console")
            await fill(page, path="/room", controls="fragment=16")
            await click(page, "connect")
            await page.wait_for(
                "#log", f"connecting to ws://127.0.0.1:{daemon.port}/room?fragment=16"
            )
            await page.wait_for("#log", " open")
            await fill(page, message="hello console, in frames of sixteen bytes")
            await click(page, "send-text")
            # the echo in three frames, put back together by the browser
            await page.wait_for("#log", "\u2190 text: hello console, in frames of sixteen bytes")
            await fill(page, message="ff 00 7f")
            await click(page, "send-binary")
            await page.wait_for("#log", "\u2190 binary (3 bytes): ff 00 7f")
            await fill(page, code="4321", reason="done here")
            await click(page, "close")
            shown = await page.wait_for("#log", " closed ")
            assert "closed 4321 done here" in shown, shown  # the server echoes both

    with chromium.browser() as tab:
        asyncio.run(main(tab))


def test_the_console_page_is_self_contained_and_locked_down(start: Callable[..., Daemon]) -> None:
    daemon = start("--console")
    status, page, headers = http_get(daemon.port, "/console")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "connect-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert "http://" not in page and "https://" not in page and " src=" not in page
    # An upgrade to /console is a WebSocket like any other.
    status, _, _ = upgrade(daemon.port, "/console", "Sec-WebSocket-Protocol: x")
    assert status == 101


def test_without_console_it_is_a_404(start: Callable[..., Daemon]) -> None:
    daemon = start()
    status, body, _ = http_get(daemon.port, "/console")
    assert (status, body) == (404, "not found: the console is off (console = true)\n")
