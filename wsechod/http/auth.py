"""Tokens at the door: where a client's token is found, what it admits, and what a
client without one gets, decided before the 101.

A token is looked for, in this order, in the ``Authorization: Bearer`` header (clients
that can set headers), in a ``bearer.<token>`` entry of ``Sec-WebSocket-Protocol`` (the
browser's way: it can set nothing else but the URL), and in the ``token`` query parameter
(simplest, but URLs end up in proxies' logs). The first place that has one is used; a
place that has two is a 400.

Refusals: 401 without a valid token, 403 with a valid token but no right to subscribe to
the channel; or, with ``auth_refusal = "close"``, the WebSocket opens and is closed at once
with 4401 or 4403 and the same reason, which a browser's script can read. Before any token
is checked, handshakes from one address are rate-limited (``handshake_rate``): a flood of
bad tokens costs a dictionary lookup each, and one address cannot take the CPU of all.
"""

import http
import time
import urllib.parse
from collections import OrderedDict

from wsechod import channels, ratelimit
from wsechod.auth import keys, tokens
from wsechod.engine import Admitted, Identity, Reply, Request
from wsechod.http import subprotocols
from wsechod.settings import Settings

warn = ratelimit.logger("wsechod.http.auth")

MAX_TOKEN = 4096  # characters: a token is a few hundred bytes; a header line at most 8 KiB
UNAUTHORIZED_CODE, FORBIDDEN_CODE = 4401, 4403  # auth_refusal = "close"
RATE_TABLE = 65_536  # client addresses whose handshake rate is followed at once


class BadRequest(ValueError):
    """The request says something twice, or says it wrong: 400 with the message."""


def find_token(request: Request) -> str | None:
    """The client's token, from the first place that has one (see above)."""
    headers = request.headers
    authorization = headers.get_all("Authorization")
    if len(authorization) > 1:
        raise BadRequest("more than one Authorization header")
    if authorization:
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise BadRequest("Authorization is not 'Bearer <token>'")
        return _sized(token.strip())
    bearers = [e for e in request.subprotocols if e.startswith(subprotocols.BEARER)]
    if len(bearers) > 1:
        raise BadRequest("more than one bearer. entry in Sec-WebSocket-Protocol")
    if bearers:
        return _sized(bearers[0][len(subprotocols.BEARER) :])
    query = urllib.parse.parse_qs(request.path.partition("?")[2], keep_blank_values=True)
    found = query.get("token", [])
    if len(found) > 1:
        raise BadRequest("more than one token query parameter")
    if found:
        if not found[0]:
            raise BadRequest("token query parameter is empty")
        return _sized(found[0])
    return None


def _sized(token: str) -> str:
    if len(token) > MAX_TOKEN:
        raise BadRequest(f"token longer than {MAX_TOKEN} characters")
    return token


class RateLimits:
    """A token bucket per client address group: ``rate`` handshakes a second, a burst of
    twice as many. The table keeps the ``RATE_TABLE`` most recent addresses; one pushed
    out starts again with a full bucket, which an address on the table never does."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def allow(self, group: str, rate: float, *, spend: bool = True) -> bool:
        """Whether ``group`` has a handshake left; ``spend``: and use it up (else only
        look: failures alone are charged, with ``charge``)."""
        if not rate or not group:
            return True
        now = time.monotonic()
        burst = 2 * rate
        tokens_, at = self._buckets.pop(group, (burst, now))
        tokens_ = min(burst, tokens_ + (now - at) * rate)
        allowed = tokens_ >= 1
        self._buckets[group] = (tokens_ - 1 if allowed and spend else tokens_, now)
        if len(self._buckets) > RATE_TABLE:
            self._buckets.popitem(last=False)
        return allowed

    def charge(self, group: str, rate: float) -> None:
        self.allow(group, rate)


class Gate:
    """The token check of one server; its key ring follows the settings (a reload that
    changes a key file or the keys themselves makes a new one)."""

    def __init__(self) -> None:
        self.rates = RateLimits()
        self._settings: Settings | None = None
        self._verifier: tokens.Verifier | None = None

    def verifier(self, settings: Settings) -> tokens.Verifier:
        """The verifier of these settings: made again after each reload, which reads the
        key files again (a rotated key under the same name is read too)."""
        if self._verifier is None or settings is not self._settings:
            try:
                ring = keys.ring(
                    settings.jwt_secret_file, settings.jwt_public_key, settings.jwt_secret
                )
            except keys.BadKey as exc:  # changed since the reload checked them
                if self._verifier is None:
                    raise
                warn.error("key files unreadable: the keys read before stay", error=str(exc))
                return self._verifier
            finally:
                self._settings = settings
            self._verifier = tokens.Verifier(
                ring,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                rights_claim=settings.jwt_rights_claim,
            )
        return self._verifier

    def admit(  # noqa: PLR0911 - one answer per rule
        self, request: Request, settings: Settings
    ) -> Reply | Identity:
        """The identity a token gives this request, or the reply that refuses it."""
        if not self.rates.allow(request.group, settings.handshake_rate):
            return too_many(request)
        try:
            token = find_token(request)
        except BadRequest as exc:
            return Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {exc}\n", refused="token")
        if token is None:
            return self._refuse(tokens.unauthorized("missing token"), request, settings)
        verifier = self.verifier(settings)
        try:
            claims = verifier.verify(token)
        except tokens.Refused as refused:
            return self._refuse(refused, request, settings)
        try:
            channel = channels.normalize(request.path)
        except channels.InvalidName as exc:  # no rights can cover what names no channel
            text = f"bad request: invalid path: {exc}\n"
            return Reply(http.HTTPStatus.BAD_REQUEST, text, refused="invalid_channel")
        if not claims.subscribe.matches(channel):
            forbidden = tokens.Refused(
                http.HTTPStatus.FORBIDDEN, "no right to this channel", f"channel {channel}"
            )
            return self._refuse(forbidden, request, settings, sub=claims.sub)
        may_publish = claims.publish.matches(channel)
        return Identity(claims.sub, may_publish, claims.expires + verifier.leeway)

    def _refuse(
        self, refused: tokens.Refused, request: Request, settings: Settings, sub: str = ""
    ) -> Reply:
        unauthorized = refused.status == http.HTTPStatus.UNAUTHORIZED
        word = "unauthorized" if unauthorized else "forbidden"
        warn.warning(
            "connection refused",
            reason=refused.reason,
            detail=refused.detail,
            peer=request.peer,
            sub=sub or None,
        )
        headers = {"WWW-Authenticate": 'Bearer realm="wsechod"'} if unauthorized else {}
        return Reply(refused.status, f"{word}: {refused.reason}\n", headers, refused=word)


def too_many(request: Request) -> Reply:
    warn.warning("connection refused", reason="handshake_rate", client=request.group)
    return Reply(
        http.HTTPStatus.TOO_MANY_REQUESTS,
        "too many requests from your address\n",
        {"Retry-After": "1"},
        refused="handshake_rate",
    )


def refusal_to_close(reply: Reply, subprotocol: str | None) -> Admitted | None:
    """``auth_refusal = "close"``: a 401 or 403 becomes a close after the 101 (with the
    subprotocol the browser needs to see selected to take the 101 at all); None for
    other refusals, which stay HTTP answers."""
    if reply.status == http.HTTPStatus.UNAUTHORIZED:
        code = UNAUTHORIZED_CODE
    elif reply.status == http.HTTPStatus.FORBIDDEN:
        code = FORBIDDEN_CODE
    else:
        return None
    return Admitted(subprotocol, close=(code, reply.body.strip()))
