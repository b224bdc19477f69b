"""The HTTP API of the relay, for backends: ``POST /publish/<channel>`` puts a message on
a channel, for its members on every instance (through the broker); ``GET /channels`` and
``GET /channels/<channel>`` say who is there (presence). Served on listeners with the
``api`` role (every listener, unless ``listen`` says otherwise: give the role to an
internal listener only to keep the API off the internet).

A request is authorised by an API key (``X-API-Key``, from ``api_key_file``) or by a
token (``Authorization: Bearer``) whose rights cover the channel. A client address whose
requests keep failing authorisation is held to ``handshake_rate`` (429), as a WebSocket
handshake is: a flood of bad keys or tokens costs little. A WebSocket upgrade to the same
paths is a channel like any other: only plain HTTP requests are the API's.
"""

import http
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from wsechod import channels, ratelimit
from wsechod.auth import apikeys, tokens
from wsechod.engine import ReadBody, Reply, Request
from wsechod.history import Published
from wsechod.http.auth import Gate, too_many
from wsechod.log import get_logger
from wsechod.settings import Settings

log = ratelimit.logger("wsechod.http.api")
debug = get_logger("wsechod.http.api")

PUBLISH = "/publish"
CHANNELS = "/channels"
JSON = "application/json"


class Publisher(Protocol):
    """What the API asks of the relay."""

    def publish(self, name: str, payload: bytes, text: bool) -> Awaitable[Published]:
        """Send to the channel's members here and, through the broker, everywhere: the
        members here it reached, and its place in history (TimeoutError, ConnectionError:
        a channel with history whose broker did not number it)."""

    def degraded(self) -> str | None: ...

    async def channel_counts(self) -> dict[str, int]:
        """Members per channel, on every instance (ConnectionError: cannot be read now)."""

    async def channel_members(self, name: str) -> tuple[int, Mapping[str, int]]:
        """One channel's members on every instance: their number, each sub's
        connections (ConnectionError: cannot be read now)."""


def is_api(request: Request) -> bool:
    """Whether a request is for the API (a WebSocket upgrade never is)."""
    route = request.route
    if route != CHANNELS and not route.startswith((PUBLISH + "/", CHANNELS + "/")):
        return False
    return "websocket" not in ",".join(request.headers.get_all("Upgrade")).lower()


def answer(status: http.HTTPStatus, document: dict[str, Any], **headers: str) -> Reply:
    body = json.dumps(document, separators=(",", ":")) + "\n"
    refused = "" if status < 400 else str(document.get("refused", "api"))
    return Reply(status, body, {k.replace("_", "-"): v for k, v in headers.items()}, JSON, refused)


def error(status: http.HTTPStatus, text: str, refused: str, **headers: str) -> Reply:
    return answer(status, {"error": text, "refused": refused}, **headers)


MAX_PAGE = 1000


def _page(request: Request) -> tuple[int, str]:
    """``limit`` (1-1000, default 100) and ``after`` (the last name of the page before)."""
    query = urllib.parse.parse_qs(request.path.partition("?")[2], keep_blank_values=True)
    limit = query.get("limit", ["100"])[-1]
    if not (limit.isascii() and limit.isdigit() and len(limit) < 5 and 1 <= int(limit) <= MAX_PAGE):
        raise ValueError(f"limit: a whole number from 1 to {MAX_PAGE}")
    return int(limit), query.get("after", [""])[-1]


def _unavailable(why: str) -> Reply:
    return error(
        http.HTTPStatus.SERVICE_UNAVAILABLE,
        f"presence unavailable: the broker does not answer ({why})",
        "presence_unavailable",
        Retry_After="1",
    )


def is_text(content_type: str | None) -> bool:
    """A body becomes a text message when its type says text (``text/*``, JSON);
    anything else, or no type, a binary one."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind.startswith("text/") or kind == JSON or kind.endswith("+json")


class Api:
    """The API's routes, for one server."""

    def __init__(
        self,
        gate: Gate,
        publisher: Publisher | None,
        draining: Callable[[], bool],
    ) -> None:
        self._gate = gate
        self._publisher = publisher
        self._draining = draining
        self._keys: tuple[apikeys.ApiKey, ...] = ()
        self._keys_for: Settings | None = None

    def handle(self, request: Request, settings: Settings) -> Reply | ReadBody | Awaitable[Reply]:
        if "api" not in request.roles:
            text = "not found: the API is served on the listeners with the api role"
            return error(http.HTTPStatus.NOT_FOUND, text, "listener")
        if self._publisher is None:
            return error(http.HTTPStatus.NOT_FOUND, "not found: no channels in echo mode", "mode")
        if request.route.startswith(PUBLISH + "/"):
            return self._publish(request, settings)
        return self._presence(request, settings)

    # --- GET /channels, GET /channels/<channel> -----------------------------------------

    def _presence(self, request: Request, settings: Settings) -> Reply | Awaitable[Reply]:
        if request.method not in ("GET", "HEAD"):
            return error(http.HTTPStatus.METHOD_NOT_ALLOWED, "use GET", "method", Allow="GET, HEAD")
        refused = self._key_only(request, settings)
        if refused is not None:
            return refused
        try:
            limit, after = _page(request)
        except ValueError as exc:
            return error(http.HTTPStatus.BAD_REQUEST, str(exc), "bad_request")
        route = request.route
        publisher = self._publisher
        assert publisher is not None
        if route == CHANNELS:
            return self._listing(publisher, limit, after)
        try:
            name = channels.name_of(route[len(CHANNELS) :])
        except channels.InvalidName as exc:
            return error(
                http.HTTPStatus.BAD_REQUEST, f"invalid channel name: {exc}", "invalid_channel"
            )
        return self._one(publisher, name, limit, after)

    async def _listing(self, publisher: Publisher, limit: int, after: str) -> Reply:
        try:
            counts = await publisher.channel_counts()
        except ConnectionError as exc:  # the broker's PresenceUnavailable
            return _unavailable(str(exc))
        names = sorted(n for n in counts if n > after)
        page = names[:limit]
        document = {
            "channels": [{"name": n, "members": counts[n]} for n in page],
            "next": page[-1] if len(names) > limit else None,
        }
        return answer(http.HTTPStatus.OK, document)

    async def _one(self, publisher: Publisher, name: str, limit: int, after: str) -> Reply:
        try:
            count, subs = await publisher.channel_members(name)
        except ConnectionError as exc:  # the broker's PresenceUnavailable
            return _unavailable(str(exc))
        ids = sorted(s for s in subs if s > after)
        page = ids[:limit]
        document = {
            "channel": name,
            "members": count,
            "anonymous": count - sum(subs.values()),
            "subs": [{"sub": s, "connections": subs[s]} for s in page],
            "next": page[-1] if len(ids) > limit else None,
        }
        return answer(http.HTTPStatus.OK, document)

    def _key_only(self, request: Request, settings: Settings) -> Reply | None:
        """Presence needs an API key (who is where is the operator's to know)."""
        rate = settings.handshake_rate
        if not self._gate.rates.allow(request.group, rate, spend=False):
            return too_many(request)
        keys = request.headers.get_all("X-API-Key")
        if len(keys) == 1 and apikeys.match(self.keys(settings), keys[0]):
            return None
        reason = "invalid API key" if keys else "presence needs an API key (X-API-Key)"
        return self._unauthorized(request, rate, reason)

    # --- POST /publish/<channel> -------------------------------------------------------

    def _publish(self, request: Request, settings: Settings) -> Reply | ReadBody:
        if request.method != "POST":
            return error(http.HTTPStatus.METHOD_NOT_ALLOWED, "use POST", "method", Allow="POST")
        if self._draining():
            return error(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down", "draining",
                Retry_After="1",
            )  # fmt: skip
        written = request.route[len(PUBLISH) :]
        if len(written) > settings.max_path_length:
            return error(
                http.HTTPStatus.REQUEST_URI_TOO_LONG, "channel name too long", "max_path_length"
            )
        try:
            name = channels.name_of(written)
        except channels.InvalidName as exc:
            return error(
                http.HTTPStatus.BAD_REQUEST, f"invalid channel name: {exc}", "invalid_channel"
            )
        refused = self._authorise(request, settings, name)
        if refused is not None:
            return refused
        text = is_text(request.headers.get("Content-Type"))
        publisher = self._publisher
        assert publisher is not None

        def then(body: bytes) -> Reply | Awaitable[Reply]:
            if text:
                try:
                    body.decode()
                except UnicodeDecodeError as exc:
                    why = (
                        f"a text body (by its Content-Type) that is not UTF-8, at byte {exc.start}"
                    )
                    return error(http.HTTPStatus.BAD_REQUEST, why, "invalid_utf8")
            return self._published(publisher, name, body, text)

        return ReadBody(settings.max_size, then)

    async def _published(self, publisher: Publisher, name: str, body: bytes, text: bool) -> Reply:
        try:
            done = await publisher.publish(name, body, text)
        except (TimeoutError, ConnectionError) as exc:  # a channel with history: not kept
            why = str(exc) or "no answer in time"
            return error(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"not published: history unavailable ({why})",
                "history_unavailable", Retry_After="1",
            )  # fmt: skip
        document: dict[str, Any] = {"channel": name, "delivered_here": done.delivered_here}
        if done.position is not None:
            document.update(offset=done.position.offset, epoch=done.position.epoch)
        if (missing := publisher.degraded()) is not None:
            document["broker"] = f"degraded: {missing}"
        return answer(http.HTTPStatus.ACCEPTED, document)

    # --- who may ---------------------------------------------------------------------

    def _authorise(  # noqa: PLR0911 - one answer per rule
        self, request: Request, settings: Settings, name: str
    ) -> Reply | None:
        """None if the request may publish to ``name``: an API key, or a token with the
        right; else the 401, 403 or 429 that refuses it."""
        rates, rate = self._gate.rates, settings.handshake_rate
        keys = request.headers.get_all("X-API-Key")
        if len(keys) == 1 and (found := apikeys.match(self.keys(settings), keys[0])):
            debug.debug("api key accepted", key=found, peer=request.peer)
            return None  # a good key is never limited (its address may be a busy NAT)
        if not rates.allow(request.group, rate, spend=False):
            return too_many(request)
        if keys:
            return self._unauthorized(request, rate, "invalid API key")
        bearer = request.headers.get("Authorization", "")
        scheme, _, token = bearer.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._unauthorized(request, rate, "missing API key or token")
        if settings.auth != "jwt":
            return self._unauthorized(request, rate, "tokens are not accepted (auth is none)")
        try:
            claims = self._gate.verifier(settings).verify(token.strip())
        except tokens.Refused as refused:
            return self._unauthorized(request, rate, refused.reason, refused.detail)
        if not claims.publish.matches(name):
            log.warning("api refused", reason="no right to publish", sub=claims.sub, channel=name)
            return error(
                http.HTTPStatus.FORBIDDEN, "forbidden: no right to publish here", "forbidden"
            )
        return None

    def _unauthorized(self, request: Request, rate: float, reason: str, detail: str = "") -> Reply:
        self._gate.rates.charge(request.group, rate)
        log.warning("api refused", reason=reason, detail=detail or None, peer=request.peer)
        return error(
            http.HTTPStatus.UNAUTHORIZED, f"unauthorized: {reason}", "unauthorized",
            WWW_Authenticate='Bearer realm="wsechod"',
        )  # fmt: skip

    def keys(self, settings: Settings) -> tuple[apikeys.ApiKey, ...]:
        """The keys of ``api_key_file``, read again after each reload."""
        if settings is not self._keys_for:
            self._keys_for = settings
            try:
                self._keys = apikeys.load(settings.api_key_file) if settings.api_key_file else ()
            except apikeys.BadKeyFile as exc:  # changed since the reload checked it
                log.error("api key file unreadable: the keys read before stay", error=str(exc))
        return self._keys
