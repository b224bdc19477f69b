"""An HTTP/1.1 request head (RFC 9112), parsed whole in one pass.

The handshake has the whole head before it parses (it found the empty line that ends it),
so there is nothing to gain from a streaming parser: websockets' ``Request.parse`` is a
generator reading a line at a time, and it and its protocol object were a third of a
handshake's server CPU. This parser keeps every check websockets makes (the same limits,
the same grammar, the same words in a 400; a limit is 414 or 431, in our words) and does
it with one match per line in the common case; the detailed checks run only to say what
is wrong with a line that fails it.

Requests with a body (other methods) are h11's (``bodies.py``); this reads GET and HEAD.
"""

from __future__ import annotations

import http
import re
from dataclasses import dataclass

from websockets.datastructures import Headers

# websockets' limits (``websockets.http11``): a line, and how many headers.
MAX_LINE = 8192
MAX_HEADERS = 128
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
FIELDS_TOO_LARGE = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"  # RFC 9110 5.6.2
# A whole header line; a value is HTAB, SP, VCHAR and obs-text (no folding). The value
# starts with a byte that is not blank, so that the blanks before it can only be the
# separator's: were both able to take them, a line of blanks ending in a byte neither
# accepts would be tried at every split (quadratic: 0.4 s of CPU for one line of 8,000
# spaces). Its trailing blanks are stripped after the match.
_FIELD = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff][\x09\x20-\x7e\x80-\xff]*)?)"
)
_NAME = re.compile(_TOKEN)
_BLANK = b" \t"


class BadRequest(ValueError):
    """What is wrong with a request head, in words for its answer (the client's text in it
    decoded with backslashes for bytes that are not UTF-8; quoting is the caller's), and
    the answer's status: 400, or for a limit 414 (the request line) or 431 (the headers)."""

    def __init__(self, text: str, status: http.HTTPStatus = http.HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True, slots=True)
class Head:
    """A request line and headers, as this parser or h11 (``bodies.py``) read them."""

    method: str
    target: str  # the path with its query string; not decoded
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers


def _text(value: bytes) -> str:
    return value.decode(errors="backslashreplace")


def parse(head: bytes) -> Head:
    """The request head, ending with its empty line (every line ending CRLF).

    Raises ``BadRequest`` saying what is wrong."""
    lines = head.split(b"\r\n")
    del lines[-2:]  # the empty line, and what follows its CRLF (nothing)
    line = lines[0]
    if len(line) + 2 > MAX_LINE:
        text = f"request line too long ({len(line) + 2} bytes; at most {MAX_LINE})"
        raise BadRequest(text, http.HTTPStatus.REQUEST_URI_TOO_LONG)
    parts = line.split(b" ", 2)
    if len(parts) != 3:
        raise BadRequest(f"invalid HTTP request line: {_text(line)}")
    method, target, version = parts
    if version not in VERSIONS:
        raise BadRequest(f"unsupported protocol; expected HTTP/1.1 or HTTP/1.0: {_text(line)}")
    if not (method.isascii() and target.isascii()):
        byte = next(b for b in method + target if b > 0x7F)
        raise BadRequest(f"a byte that is not ASCII in the request head (0x{byte:02x})")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(f"too many headers (at most {MAX_HEADERS})", FIELDS_TOO_LARGE)
    headers = Headers()
    match = _FIELD.fullmatch
    for line in lines[1:]:
        if len(line) + 2 > MAX_LINE:
            text = f"header line too long ({len(line) + 2} bytes; at most {MAX_LINE})"
            raise BadRequest(text, FIELDS_TOO_LARGE)
        found = match(line)
        if found is None:
            raise BadRequest(_field_error(line))
        name, value = found.groups()
        headers[name.decode()] = value.rstrip(_BLANK).decode("iso-8859-1")
    # RFC 9112 6.3: no body on an upgrade; some clients send Content-Length: 0.
    if "Transfer-Encoding" in headers:
        raise BadRequest("transfer codings aren't supported")
    if not set(headers.get_all("Content-Length")) <= {"0"}:
        raise BadRequest("unsupported request body")
    return Head(method.decode(), target.decode(), version.decode(), headers)


def _field_error(line: bytes) -> str:
    """What is wrong with a header line that does not match the grammar."""
    name, colon, value = line.partition(b":")
    if not colon:
        return f"invalid HTTP header line: {_text(line)}"
    if not _NAME.fullmatch(name):
        return f"invalid HTTP header name: {_text(name)}"
    return f"invalid HTTP header value: {_text(value.strip(_BLANK))}"
