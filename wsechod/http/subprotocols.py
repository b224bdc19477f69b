"""Subprotocol negotiation, one function for every mode: the server selects at most one
protocol the client offered. ``wsechod.v1`` when offered (envelopes with offsets, see the
recovery page), else the first offered that ``subprotocols`` lists, else the marker
``wsechod.auth`` when offered: a browser that carries its token as a ``bearer.<token>``
entry offers the marker beside it, and fails a connection whose 101 selects none of what
it offered. A ``bearer.`` entry is never selected (it would echo the token back)."""

from collections.abc import Sequence

from wsechod.history import V1

AUTH_MARKER = "wsechod.auth"
BEARER = "bearer."


def select(offers: Sequence[str], configured: Sequence[str], *, v1: bool = False) -> str | None:
    """The one to select; ``v1``: whether this server speaks ``wsechod.v1``."""
    if v1 and V1 in offers:
        return V1
    for entry in offers:
        if entry in configured and not entry.startswith(BEARER):
            return entry
    if AUTH_MARKER in offers:
        return AUTH_MARKER
    return None


def named(offers: Sequence[str]) -> list[str]:
    """The offers that name a subprotocol (a ``bearer.`` entry carries a token instead)."""
    return [entry for entry in offers if not entry.startswith(BEARER)]
