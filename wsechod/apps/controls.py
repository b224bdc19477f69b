"""The test peer's controls: what the query string of an upgrade request asks the server to
do to this connection (misbehave on purpose, reproducibly), checked before the upgrade.

Every control is bounded, and a control given twice, out of range, malformed, or without
the control it qualifies is refused with 400 naming it (``InvalidControl``): a test that
asks for something the server will not do must hear so, not get a silent echo. Unknown
parameters are ignored (clients add cache-busters); ``token``, ``since`` and ``epoch`` are
not controls. The docs' "Test peer" page holds the same table.
"""

import http
import re
import urllib.parse
from dataclasses import dataclass

from wsechod.engine.frames import valid_peer_code

MAX_MS = 60_000  # delays, at most a minute
MIN_PING, MAX_PING = 0.1, 60.0  # seconds between the test peer's pings
MAX_SEND_BYTES = 64 * 2**20  # what one connection's send stream carries in all...
MAX_SEND_MESSAGES = 1_000_000  # ...in at most this many messages
MAX_FRAMES = 65_536  # frames one message is cut into, at most (fragment)
MAX_SEND_RATE = 10_000  # messages a second
MIN_THROTTLE, MAX_THROTTLE = 1024, 2**30  # bytes a second
MAX_REASON = 123  # bytes of UTF-8 in a close frame's reason (RFC 6455 5.5: 125 - the code)
MAX_AFTER = 1_000_000  # messages before an ending
VIOLATIONS = {
    "utf8": "invalid UTF-8 in a text message",
    "rsv": "a frame with RSV2 and RSV3 set (no extension defines them)",
    "masked": "a masked frame (a server never masks)",
    "opcode": "a frame with an unknown opcode (0x3)",
    "fragmented_control": "a ping without FIN (control frames are never fragmented)",
    "big_control": "a ping of 126 bytes (control frames carry at most 125)",
    "close_code": "a close frame with code 1005 (never sent on the wire)",
    "continuation": "a continuation frame that continues nothing",
}
ECHO_ONLY = ("delay", "fragment", "send")  # the others act on any connection, the relay's too
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")  # RFC 9110 5.6.2
_HEADER_TEXT = re.compile(r"[\x20-\x7e]{1,512}")  # printable ASCII: nothing to inject
_URL_TEXT = re.compile(r"[\x21-\x7e]{1,2048}")  # and no space in a URL
OURS = frozenset(
    {
        "status", "retry_after", "location", "www_authenticate", "accept_delay", "subprotocol",
        "delay", "fragment", "close", "reason", "after", "drop", "how", "violate",
        "no_close_reply", "ping", "no_pong", "send", "size", "rate", "type", "throttle",
        "headers", "compress",
    }
)  # fmt: skip


class InvalidControl(ValueError):
    """A control the server will not carry out: which, and why (the 400's body)."""

    def __init__(self, name: str, value: str, why: str) -> None:
        super().__init__(f"control {name}={value[:40]!r}: {why}")


@dataclass(frozen=True, slots=True)
class Controls:
    """One connection's controls (the defaults: none). Times in seconds."""

    status: http.HTTPStatus | None = None
    retry_after: int | None = None
    location: str = ""
    www_authenticate: str = ""
    accept_delay: float = 0.0
    subprotocol: str = ""
    delay: float = 0.0
    fragment: int = 0
    close: int = 0
    reason: str = ""
    after: int = 0
    drop: int | None = None
    reset: bool = True  # drop: an RST (how=rst), or a FIN (how=fin)
    violate: str = ""
    no_close_reply: bool = False
    ping: float = 0.0
    no_pong: bool = False
    send: int = 0
    size: int = 16
    rate: float = 0.0
    text: bool = True
    throttle: int = 0
    headers: bool = False
    compress: bool = True


class _Reader:
    """The query's parameters that are controls, each read once."""

    def __init__(self, query: str) -> None:
        self.given: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if name not in OURS:
                continue
            if name in self.given:
                raise InvalidControl(name, value, "given twice")
            self.given[name] = value

    def number(self, name: str, low: float, high: float, *, whole: bool = True) -> float | None:
        value = self.given.get(name)
        if value is None:
            return None
        pattern = r"[0-9]{1,10}" if whole else r"[0-9]{1,10}(\.[0-9]{1,6})?"
        if not re.fullmatch(pattern, value):
            kind = "a whole number" if whole else "a number"
            raise InvalidControl(name, value, f"expected {kind} from {_n(low)} to {_n(high)}")
        number = float(value)
        if not low <= number <= high:
            raise InvalidControl(name, value, f"out of range: {_n(low)} to {_n(high)}")
        return number

    def flag(self, name: str, *, off: bool = False) -> bool | None:
        value = self.given.get(name)
        if value is None:
            return None
        if value not in ("0", "1") or (value == "0" and not off):
            raise InvalidControl(name, value, "expected 1" if not off else "expected 0 or 1")
        return value == "1"

    def needs(self, name: str, *owners: str) -> None:
        if name in self.given and not any(owner in self.given for owner in owners):
            owner = " or ".join(f"{o}=" for o in owners)
            raise InvalidControl(name, self.given[name], f"goes with {owner}")


def _n(number: float) -> str:
    """A bound as written: 67108864, not 6.71089e+07; 0.1 stays 0.1."""
    return str(int(number)) if number == int(number) else f"{number:g}"


def parse(path: str, max_size: int, *, echo: bool) -> Controls | None:
    """The controls of a request target (None: it asks for none). ``max_size``: the
    largest message the connection may carry (``send``'s size, ``fragment``). ``echo``
    False (the relay): the controls that act on echoes (``ECHO_ONLY``) are refused."""
    query = path.partition("?")[2]
    if not query:
        return None
    read = _Reader(query)
    if not read.given:
        return None
    for name, owners in (
        ("retry_after", ("status",)), ("location", ("status",)),
        ("www_authenticate", ("status",)), ("reason", ("close",)),
        ("after", ("close", "violate")), ("how", ("drop",)),
        ("size", ("send",)), ("rate", ("send",)), ("type", ("send",)),
    ):  # fmt: skip
        read.needs(name, *owners)
    if not echo and (echoing := next((n for n in ECHO_ONLY if n in read.given), None)):
        raise InvalidControl(echoing, read.given[echoing], "acts on echoes: echo mode only")
    endings = [name for name in ("close", "drop", "violate") if name in read.given]
    if len(endings) > 1:
        second = endings[1]
        why = f"one ending at a time ({endings[0]}= is given)"
        raise InvalidControl(second, read.given[second], why)
    fields: dict[str, object] = {}
    _status(read, fields)
    _timing(read, fields, max_size)
    _endings(read, fields)
    _stream(read, fields, max_size)
    return Controls(**fields)  # type: ignore[arg-type]


def _status(read: _Reader, fields: dict[str, object]) -> None:
    status = read.number("status", 300, 599)
    if status is None:
        return
    try:
        fields["status"] = http.HTTPStatus(int(status))
    except ValueError:
        raise InvalidControl(
            "status", read.given["status"], "not a registered HTTP status"
        ) from None
    if (after := read.number("retry_after", 0, 86_400)) is not None:
        fields["retry_after"] = int(after)
    if (location := read.given.get("location")) is not None:
        parts = urllib.parse.urlsplit(location)
        if not (_URL_TEXT.fullmatch(location) and parts.scheme in ("http", "https", "ws", "wss")
                and parts.netloc):  # fmt: skip
            why = "expected an absolute http(s) or ws(s) URL"
            raise InvalidControl("location", location, why)
        fields["location"] = location
    if (challenge := read.given.get("www_authenticate")) is not None:
        if not _HEADER_TEXT.fullmatch(challenge):
            why = "expected printable ASCII, 512 characters at most"
            raise InvalidControl("www_authenticate", challenge, why)
        fields["www_authenticate"] = challenge


def _timing(read: _Reader, fields: dict[str, object], max_size: int) -> None:
    for name in ("accept_delay", "delay"):
        if (ms := read.number(name, 0, MAX_MS)) is not None:
            fields[name] = ms / 1000
    if (subprotocol := read.given.get("subprotocol")) is not None:
        if not _TOKEN.fullmatch(subprotocol):
            raise InvalidControl("subprotocol", subprotocol, "expected a token (RFC 9110 5.6.2)")
        fields["subprotocol"] = subprotocol
    smallest = max(1, -(-max_size // MAX_FRAMES))  # a message is at most MAX_FRAMES frames
    if (fragment := read.number("fragment", smallest, max(smallest, max_size))) is not None:
        fields["fragment"] = int(fragment)
    if (ping := read.number("ping", MIN_PING, MAX_PING, whole=False)) is not None:
        fields["ping"] = ping
    if (throttle := read.number("throttle", MIN_THROTTLE, MAX_THROTTLE)) is not None:
        fields["throttle"] = int(throttle)
    for name in ("no_pong", "no_close_reply", "headers"):
        if read.flag(name):
            fields[name] = True
    if read.flag("compress", off=True) is False:
        fields["compress"] = False


def _endings(read: _Reader, fields: dict[str, object]) -> None:
    if (code := read.number("close", 1000, 4999)) is not None:
        if not valid_peer_code(int(code)):
            raise InvalidControl(
                "close", read.given["close"], "not a code an endpoint may send (1000-1003, "
                "1007-1014, 3000-4999)"
            )  # fmt: skip
        fields["close"] = int(code)
        reason = read.given.get("reason", "")
        if len(reason.encode()) > MAX_REASON:
            raise InvalidControl("reason", reason, f"longer than {MAX_REASON} bytes of UTF-8")
        fields["reason"] = reason
    if (after := read.number("after", 0, MAX_AFTER)) is not None:
        fields["after"] = int(after)
    if (drop := read.number("drop", 0, MAX_AFTER)) is not None:
        fields["drop"] = int(drop)
        how = read.given.get("how", "rst")
        if how not in ("rst", "fin"):
            raise InvalidControl("how", how, "expected rst or fin")
        fields["reset"] = how == "rst"
    if (kind := read.given.get("violate")) is not None:
        if kind not in VIOLATIONS:
            raise InvalidControl("violate", kind, "expected one of " + ", ".join(VIOLATIONS))
        fields["violate"] = kind


def _stream(read: _Reader, fields: dict[str, object], max_size: int) -> None:
    count = read.number("send", 1, MAX_SEND_MESSAGES)
    if count is None:
        return
    size = read.number("size", 0, max_size)
    size = 16 if size is None else size
    if count * max(size, 1) > MAX_SEND_BYTES:
        raise InvalidControl(
            "send", read.given["send"], f"send x size over {MAX_SEND_BYTES} bytes in all"
        )
    fields["send"], fields["size"] = int(count), int(size)
    if (rate := read.number("rate", 0, MAX_SEND_RATE, whole=False)) is not None:
        fields["rate"] = rate
    kind = read.given.get("type", "text")
    if kind not in ("text", "binary"):
        raise InvalidControl("type", kind, "expected text or binary")
    fields["text"] = kind == "text"
