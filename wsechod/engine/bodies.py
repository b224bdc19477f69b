"""Requests with a body (the HTTP API's ``POST``): parsed by h11, a maintained HTTP/1.1
parser, not by hand (request smuggling lives in hand-written length rules). The opening
handshake's parser (``request.py``) refuses bodies.

One request per connection: the answer says ``Connection: close``. A body has a length
(``Content-Length``) or comes in chunks; a request that says both is refused (RFC 9112
6.3: the shape of request smuggling, which h11 would accept). A body is at most what
admission allows: a ``Content-Length`` over it is refused before a byte of the body is
read, and before ``100 Continue`` is sent to a client that waits for it (curl does).
"""

import http

import h11
from websockets.datastructures import Headers

from wsechod.engine.interface import Reply
from wsechod.engine.request import Head

MAX_HEAD = 16 * 1024


def bad(text: str) -> Reply:
    return Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {text}\n", refused="bad_request")


def too_big(limit: int) -> Reply:
    return Reply(
        http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"request body over {limit} bytes\n",
        refused="body_too_large",
    )


def declared(head: Head) -> int | None:
    """What ``Content-Length`` says (h11 has checked it), if the request says."""
    value = head.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value.split(",")[0])
    except ValueError:
        return None


class BodyReader:
    """One request: its head, then its body as it arrives."""

    __slots__ = ("_body", "_conn", "limit")

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._body = bytearray()
        self.limit = 0

    def head(self, data: bytes) -> Head | Reply:
        """The request's head (``data`` holds all of it, and maybe part of the body), or
        the 400 that refuses it."""
        conn = self._conn
        conn.receive_data(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return bad(str(exc))
        if not isinstance(event, h11.Request):
            return bad("incomplete request head")
        names = [name for name, _ in event.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            return bad("both Content-Length and Transfer-Encoding")
        headers = Headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        return Head(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii", "replace"),
            version="HTTP/" + event.http_version.decode("ascii"),
            headers=headers,
        )

    @property
    def waits_for_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and waits before sending its body."""
        return bool(self._conn.they_are_waiting_for_100_continue)

    def feed(self, data: bytes) -> bytes | Reply | None:
        """More of the body: the whole body once it is complete, a reply that refuses it
        (400, or 413 once it grows over ``limit``), or None (more is needed)."""
        conn = self._conn
        if data:
            conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return bad(str(exc))
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Data):
                if len(self._body) + len(event.data) > self.limit:
                    return too_big(self.limit)
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                body, self._body = bytes(self._body), bytearray()
                return body
            elif event is h11.PAUSED:  # pragma: no cover - one request per connection
                return bad("more than one request")

    @property
    def held(self) -> int:
        """Bytes of body read so far."""
        return len(self._body)
