"""The server's answer to a WebSocket upgrade (RFC 6455 4.2): its checks, the extensions
and subprotocol, and the 101 as bytes.

Every check websockets' ``ServerProtocol.accept`` makes is made here, refused with the same
status and words (405 for another method, 426 without Upgrade/Connection, 400 for a key,
version or header that is wrong), but without building its protocol object, its
``Response`` and its header maps for each handshake: the common request (one Connection and
one Upgrade value, no extensions) is checked with string comparisons, and the grammar
parsers of ``websockets.headers`` run only for what is not that. Extensions are still
negotiated by websockets' extension factories.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import http
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import (
    InvalidHandshake,
    InvalidHeader,
    InvalidHeaderValue,
    InvalidMethod,
    InvalidUpgrade,
    NegotiationError,
)
from websockets.extensions import Extension, ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.headers import (
    build_extension,
    parse_connection,
    parse_extension,
    parse_subprotocol,
    parse_upgrade,
)

from wsechod.engine.request import Head

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


@dataclass(frozen=True, slots=True)
class Upgrade:
    response: bytes  # the 101, ready to write
    extensions: list[Extension]  # negotiated, in the client's order


@dataclass(frozen=True, slots=True)
class Refusal:
    status: http.HTTPStatus
    text: str  # one line
    headers: dict[str, str] = field(default_factory=dict)


_date = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    global _date  # noqa: PLW0603 - a cache of one entry
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def accept(
    head: Head,
    factories: Sequence[ServerExtensionFactory] | None,
    subprotocol: str | None,
    server: str,
) -> Upgrade | Refusal:
    """The 101 for ``head``, with ``subprotocol`` (admission's choice) and the extensions
    ``factories`` accept; or why not."""
    try:
        key = _checked(head)
        extensions, offered = _negotiate(head.headers, factories)
        for value in head.headers.get_all("Sec-WebSocket-Protocol"):
            parse_subprotocol(value)  # its grammar: 400 if it is not a list of tokens
    except InvalidMethod as exc:
        return Refusal(http.HTTPStatus.METHOD_NOT_ALLOWED, _failed(exc), {"Allow": "GET"})
    except InvalidUpgrade as exc:
        status, upgrade = http.HTTPStatus.UPGRADE_REQUIRED, {"Upgrade": "websocket"}
        return Refusal(status, _failed(exc), upgrade)
    except InvalidHandshake as exc:
        return Refusal(http.HTTPStatus.BAD_REQUEST, _failed(exc))
    digest = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Date: " + http_date().encode(),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + digest,
    ]
    if offered is not None:
        lines.append(b"Sec-WebSocket-Extensions: " + offered.encode())
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode())
    lines.append(b"Server: " + server.encode())
    return Upgrade(b"\r\n".join(lines) + b"\r\n\r\n", extensions)


def _failed(exc: BaseException) -> str:
    """websockets' words for a refused handshake, with the causes after them."""
    text = str(exc)
    while exc.__cause__ is not None:
        exc = exc.__cause__
        text += f"; {exc}"
    return f"Failed to open a WebSocket connection: {text}."


def _one(headers: Headers, name: str) -> str:
    try:
        return headers[name]
    except KeyError:
        raise InvalidHeader(name) from None
    except MultipleValuesError:
        raise InvalidHeader(name, "multiple values") from None


def _checked(head: Head) -> str:
    """The request's Sec-WebSocket-Key, once every check of 4.2.1 passed."""
    if head.method != "GET":
        raise InvalidMethod(head.method)
    headers = head.headers
    connection = headers.get_all("Connection")
    if not (len(connection) == 1 and connection[0].lower() == "upgrade"):
        options = [option for value in connection for option in parse_connection(value)]
        if not any(option.lower() == "upgrade" for option in options):
            raise InvalidUpgrade("Connection", ", ".join(options) if options else None)
    upgrade = headers.get_all("Upgrade")
    if not (len(upgrade) == 1 and upgrade[0].lower() == "websocket"):
        protocols = [protocol for value in upgrade for protocol in parse_upgrade(value)]
        # Case-insensitive, as websockets (and most clients) read it.
        if not (len(protocols) == 1 and protocols[0].lower() == "websocket"):
            raise InvalidUpgrade("Upgrade", ", ".join(protocols) if protocols else None)
    key = _one(headers, "Sec-WebSocket-Key")
    try:
        raw = base64.b64decode(key.encode(), validate=True)
    except binascii.Error as exc:
        raise InvalidHeaderValue("Sec-WebSocket-Key", key) from exc
    if len(raw) != 16:
        raise InvalidHeaderValue("Sec-WebSocket-Key", key)
    version = _one(headers, "Sec-WebSocket-Version")
    if version != "13":
        raise InvalidHeaderValue("Sec-WebSocket-Version", version)
    if len(headers.get_all("Origin")) > 1:  # RFC 6454 7.3: at most one
        raise InvalidHeader("Origin", "multiple values")
    return key


# Offers negotiated before, with what they got: browsers make one of a few offers, and
# negotiating one (the header's grammar, the parameters) cost as much as the rest of the
# upgrade. Kept: the response header and each permessage-deflate's parameters (not the
# extension websockets made, which holds zlib objects the engine never uses: its own codec
# reads the parameters, deflate.negotiated), keyed by the factories themselves. A client
# can make any number of different offers: past OFFERS_KEPT the cache starts again.
OFFERS_KEPT = 64
_Terms = tuple[bool, bool, int, int, dict[str, Any]]
_Offer = tuple[tuple[ServerExtensionFactory, ...], tuple[str, ...]]
_offers: dict[_Offer, tuple[list[_Terms], str | None]] = {}


def _negotiate(
    headers: Headers, factories: Sequence[ServerExtensionFactory] | None
) -> tuple[list[Extension], str | None]:
    """The extensions accepted and the response header (cached by offer)."""
    values = headers.get_all("Sec-WebSocket-Extensions")
    if not values or not factories:
        return [], None
    offer = (tuple(factories), tuple(values))
    if (known := _offers.get(offer)) is not None:
        terms, answer = known
        return [PerMessageDeflate(*each) for each in terms], answer
    extensions, answer = _negotiated(values, factories)
    deflates = [e for e in extensions if isinstance(e, PerMessageDeflate)]
    if len(deflates) == len(extensions):  # another kind of extension: not kept
        if len(_offers) >= OFFERS_KEPT:
            _offers.clear()
        _offers[offer] = ([_terms(e) for e in deflates], answer)
    return extensions, answer


def _terms(extension: PerMessageDeflate) -> _Terms:
    return (
        extension.remote_no_context_takeover,
        extension.local_no_context_takeover,
        extension.remote_max_window_bits,
        extension.local_max_window_bits,
        extension.compress_settings,
    )


def _negotiated(
    values: list[str], factories: Sequence[ServerExtensionFactory]
) -> tuple[list[Extension], str | None]:
    """Each extension offered tried against each factory in turn (the first that accepts
    its parameters wins; RFC 6455 9.1)."""
    accepted: list[Extension] = []
    answers = []
    for value in values:
        for name, params in parse_extension(value):
            for factory in factories:
                if factory.name != name:
                    continue
                try:
                    response, extension = factory.process_request_params(params, accepted)
                except NegotiationError:
                    continue
                answers.append((name, response))
                accepted.append(extension)
                break
    return accepted, (build_extension(answers) if answers else None)
