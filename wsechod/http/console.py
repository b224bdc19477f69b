"""The console (``console = true``): one self-contained page at ``/console`` to try the
server from a browser: connect (any path, test peer controls), send text or binary, see
every message and close with timestamps, close with a code.

The page (``wsechod/data/console.html``) loads nothing from elsewhere, and its
Content-Security-Policy allows exactly its own inline script and style (by their SHA-256)
and connections back to this server: nothing injected into it could run or call out.
"""

import base64
import functools
import hashlib
import http
import re
from importlib import resources

from wsechod.engine import Reply

ROUTE = "/console"


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def page() -> Reply:
    html = (resources.files("wsechod") / "data" / "console.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src " + " ".join(map(_sha256, scripts)),
            "style-src " + " ".join(map(_sha256, styles)),
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return Reply(http.HTTPStatus.OK, html, headers, content_type="text/html; charset=utf-8")


NOT_SERVED = Reply(
    http.HTTPStatus.NOT_FOUND, "not found: the console is off (console = true)\n", refused="console"
)
