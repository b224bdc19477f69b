"""A real headless Chromium for the tests of pages, driven over the DevTools protocol (a
WebSocket of its own): open a page, read what it shows, wait until it shows something."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def needed() -> str:
    """The browser, or the test module skipped loudly (failed in CI, which must run it)."""
    if CHROMIUM is None:
        why = "Chromium is missing: `make browser` installs it (Debian package chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run these tests", pytrace=False)
        pytest.skip(f"SKIPPED LOUDLY: {why}", allow_module_level=True)
    return CHROMIUM


@contextmanager
def browser() -> Iterator[str]:
    """A headless Chromium, stopped on the way out: the DevTools address of its tab."""
    # Its helper processes may still write in the profile for a moment after the kill.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        said = Path(profile) / "stderr"
        with said.open("wb") as stderr:
            chrome = subprocess.Popen(
                [
                    needed(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
                ],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        try:
            # Chromium writes the port, then its own path, once it listens.
            written = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while len(lines := written.read_text().split() if written.exists() else []) < 2:
                if chrome.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Chromium did not start: {said.read_text()[-2000:]}")
                time.sleep(0.05)
            with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json", timeout=10) as listed:
                tab = next(t for t in json.load(listed) if t["type"] == "page")
            yield tab["webSocketDebuggerUrl"]
        finally:
            os.killpg(chrome.pid, signal.SIGKILL)  # with its renderer and helpers
            chrome.wait(timeout=10)


class Page:
    """The tab, as the DevTools protocol shows it."""

    def __init__(self, devtools: ClientConnection) -> None:
        self._devtools = devtools
        self._calls = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._calls += 1
        call = {"id": self._calls, "method": method, "params": params}
        await self._devtools.send(json.dumps(call))
        while True:  # events in between are not ours
            answer: dict[str, Any] = json.loads(await self._devtools.recv())
            if answer.get("id") == self._calls:
                assert "error" not in answer, answer
                return answer["result"]  # type: ignore[no-any-return]

    async def text(self, selector: str) -> str:
        """The text of the element ``selector`` finds ("" while there is none)."""
        found = await self.call(
            "Runtime.evaluate",
            expression=f"document.querySelector({json.dumps(selector)})?.textContent ?? ''",
            returnByValue=True,
        )
        return str(found["result"]["value"])

    async def wait_for(self, selector: str, wanted: str, seconds: float = 20) -> str:
        """The element's text once it contains ``wanted``; AssertionError with the text
        after ``seconds``."""
        deadline = time.monotonic() + seconds
        while wanted not in (shown := await self.text(selector)):
            assert time.monotonic() < deadline, f"{wanted!r} not in {shown!r}"
            await asyncio.sleep(0.05)
        return shown


@asynccontextmanager
async def page(tab: str, url: str) -> AsyncIterator[Page]:
    """The tab of ``browser()`` showing ``url``."""
    async with connect(tab, max_size=None) as devtools:
        shown = Page(devtools)
        await shown.call("Page.navigate", url=url)
        yield shown
