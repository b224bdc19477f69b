"""Channel history, as the relay and its clients see it: positions, the ``wsechod.v1``
envelope, and the ``since``/``epoch`` query parameters of a resume.

A channel with history numbers its messages: each gets the next *offset* (1, 2, ...), and
the channel has an *epoch*, a token that changes whenever its history may have been lost
(a broker restarted, Redis flushed or failed over to a replica that lacked some of it).
An offset means something only with its epoch.

Clients that negotiate the ``wsechod.v1`` subprotocol receive every message in an
envelope: one ASCII line before the payload, in the message's own frame type, so that text
stays text and binary stays binary, and a message is still framed once for all of them::

    m <offset> <epoch>\\n<payload>   a message
    p <offset> <epoch>\\n            your position: nothing missed, the next message is offset + 1
    l <offset> <epoch>\\n            lost: what came after your ``since`` up to <offset> cannot
                                    be delivered; what follows is live, from offset + 1

On a channel that keeps no history, offset and epoch are ``0 -``.
"""

import base64
import os
import re
import urllib.parse
from typing import NamedTuple

V1 = "wsechod.v1"  # the subprotocol of envelopes
NO_EPOCH = "-"  # on a channel without history
MAX_OFFSET = 2**63 - 1  # Redis's counters are signed 64-bit integers
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Position(NamedTuple):
    """Where a message is in its channel: ``offset`` within ``epoch``."""

    offset: int
    epoch: str


NOWHERE = Position(0, NO_EPOCH)


class History(NamedTuple):
    """A channel's history settings: at most ``size`` messages, each for ``ttl`` seconds."""

    size: int
    ttl: float


class Stored(NamedTuple):
    """A message as history keeps it (with Redis, with the id it was published with)."""

    offset: int
    payload: bytes
    text: bool
    message_id: int = 0


class Recovery(NamedTuple):
    """What history holds after a position: ``entries`` in order (at most the limit asked
    for), the channel's ``top`` offset and epoch; ``entries`` is None when the position
    cannot be continued (another epoch, or entries after it are gone)."""

    top: Position
    entries: list[Stored] | None


class Published(NamedTuple):
    """What a publish through the HTTP API did: the members here it reached, and where
    the message is in its channel's history (None: the channel keeps none)."""

    delivered_here: int
    position: Position | None


def continued(since: Position | None, top: Position, after: list[Stored]) -> Recovery:
    """What a broker answers a reader at ``since``, given the channel's ``top`` and the
    entries its history holds after ``since`` (in order, as many as were asked for)."""
    if since is None or since == top:
        return Recovery(top, [])
    if since.epoch != top.epoch or since.offset > top.offset:
        return Recovery(top, None)  # another epoch, or more than there is
    if not after or after[0].offset != since.offset + 1:
        return Recovery(top, None)  # what came next has left history
    return Recovery(top, after)


class InvalidResume(ValueError):
    """A ``since`` or ``epoch`` query parameter that is not one: the message names it."""


def new_epoch() -> str:
    """A fresh epoch: 16 random bytes, base64url (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def resume_of(path: str) -> Position | None:
    """The position a client resumes from (``?since=N&epoch=E``), or None; InvalidResume
    names a parameter that is given twice, or with a bad value, or without the other."""
    query = path.partition("?")[2]
    if "since" not in query and "epoch" not in query:
        return None  # the common case, without parsing
    found: dict[str, list[str]] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name in ("since", "epoch"):
            found.setdefault(name, []).append(value)
    if not found:
        return None
    for name, values in found.items():
        if len(values) > 1:
            raise InvalidResume(f"{name} given {len(values)} times")
    since, epoch = found.get("since", [None])[0], found.get("epoch", [None])[0]
    if since is None or epoch is None:
        raise InvalidResume("since and epoch go together (both from the last envelope)")
    if not since.isascii() or not since.isdigit() or len(since) > 19 or int(since) > MAX_OFFSET:
        raise InvalidResume(f"since={since[:40]!r}: an offset (0 or more)")
    if epoch != NO_EPOCH and not _EPOCH.fullmatch(epoch):
        raise InvalidResume(f"epoch={epoch[:40]!r}: an epoch from an envelope")
    return Position(int(since), epoch)


def head(kind: bytes, at: Position) -> bytes:
    """An envelope's line: ``kind`` (m, p or l), the offset and the epoch."""
    return b"%s %d %s\n" % (kind, at.offset, at.epoch.encode())


MESSAGE, POSITION, LOST = b"m", b"p", b"l"
