"""HTTP admission: what a request gets before any upgrade, as a function from the request
to a reply (or None: go on with the WebSocket handshake).

Operations endpoints live on the WebSocket port by default (``/healthz``, ``/metrics``), so
a load balancer checks, and Prometheus scrapes, the very socket clients use; a listener's
roles (``listen = ["0.0.0.0:8765 public", "127.0.0.1:9100 ops"]``) put them apart: a
request for what its listener does not serve gets 404. Refusals are decided here, before
the 101, so that a client over a limit gets a definite HTTP status rather than a WebSocket
that closes at once.
"""

import dataclasses
import http
from collections.abc import Awaitable, Callable, Sized
from typing import Protocol

from wsechod import history, ratelimit
from wsechod.engine import Admission, Admitted, Application, ReadBody, Reply, Request
from wsechod.http import api, auth, console, origins, subprotocols
from wsechod.settings import Settings

warn = ratelimit.logger("wsechod.http.admission")

ALLOW = {"Allow": "GET, HEAD"}
OPS_ROUTES = ("/healthz", "/metrics")  # the ops role's
# Seconds a client over max_connections_per_ip is told to wait: about how long a client
# that reconnects in a loop takes to notice that one of its own connections went away.
RETRY_AFTER = 5


class State(Protocol):
    @property
    def draining(self) -> bool: ...

    @property
    def connections(self) -> Sized: ...

    @property
    def upgrading(self) -> int: ...

    def connections_from(self, group: str) -> int: ...


def admission(
    state: State,
    app: Application,
    settings: Callable[[], Settings],
    *,
    metrics: Callable[[], Reply] | None = None,
    degraded: Callable[[], str | None] | None = None,
    draining: Callable[[], bool] | None = None,
    publisher: api.Publisher | None = None,
) -> Admission:
    """``settings()``: the settings of the moment (a reload may change the limits);
    ``metrics()``: the ``/metrics`` page, rendered at each request; ``degraded()``: what
    ``/healthz`` reports missing (default: the application's, ``app.degraded``);
    ``draining()``: whether ``/healthz`` says so (default: ``state.draining``; a worker
    answers for the daemon, which does not drain when one worker is recycled);
    ``publisher``: the relay, which the HTTP API publishes through (None: no API)."""
    why = app.degraded if degraded is None else degraded
    stopping = (lambda: state.draining) if draining is None else draining
    gate = auth.Gate()
    routes = api.Api(gate, publisher, lambda: state.draining)

    def admit(  # noqa: PLR0911, PLR0912 - one answer per rule
        request: Request,
    ) -> Reply | Awaitable[Reply] | ReadBody | Admitted | None:
        if api.is_api(request):  # counted for its address like any connection
            current = settings()
            return per_address_refused(state, request, current) or routes.handle(request, current)
        if request.method not in ("GET", "HEAD"):
            text = "only GET is served\n"
            return Reply(http.HTTPStatus.METHOD_NOT_ALLOWED, text, ALLOW, refused="method")
        route = request.route
        if route in OPS_ROUTES:
            if "ops" not in request.roles:
                text = f"not found: {route} is served on the operations listener\n"
                return Reply(http.HTTPStatus.NOT_FOUND, text, refused="listener")
            if route == "/healthz":
                return health(stopping, why)
            if metrics is not None:
                return metrics()  # during the drain too: its last figures matter most
        if "public" not in request.roles:
            text = "not found: this listener serves no WebSocket clients\n"
            return Reply(http.HTTPStatus.NOT_FOUND, text, refused="listener")
        if route == console.ROUTE and not is_upgrade(request):
            return console.page() if settings().console else console.NOT_SERVED
        if state.draining:
            text = "server is shutting down\n"
            return Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, text, refused="draining")
        if not is_upgrade(request):
            text = "this is a WebSocket server; connect with a WebSocket client\n"
            status, upgrade = http.HTTPStatus.UPGRADE_REQUIRED, {"Upgrade": "websocket"}
            return Reply(status, text, upgrade, refused="not_websocket")
        if request.method != "GET":
            text = "upgrades use GET\n"
            return Reply(http.HTTPStatus.METHOD_NOT_ALLOWED, text, ALLOW, refused="method")
        current = settings()
        refused = origin_refused(request, current) or per_address_refused(state, request, current)
        if refused is not None:
            return refused
        max_connections = current.max_connections
        if max_connections and len(state.connections) + state.upgrading >= max_connections:
            warn.warning("connection refused", reason="max_connections", limit=max_connections)
            text = "too many connections\n"
            return Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, text, refused="max_connections")
        return websocket_terms(request, current)

    def websocket_terms(request: Request, current: Settings) -> Reply | Admitted | None:
        """The WebSocket's own terms: its token, if asked for, the application's limits,
        the subprotocol it gets."""
        offers = request.subprotocols
        chosen = subprotocols.select(offers, current.subprotocols, v1=current.mode == "relay")
        if (refused := query_refused(request, offers, chosen, current)) is not None:
            return refused
        identity = None
        if current.auth == "jwt":
            checked = gate.admit(request, current)
            if isinstance(checked, Reply):
                closing = current.auth_refusal == "close"
                return (closing and auth.refusal_to_close(checked, chosen)) or checked
            identity = checked
        answer = app.admit(request)
        if isinstance(answer, Reply):
            return answer
        if isinstance(answer, Admitted):  # on the application's terms (the test peer's)
            subprotocol = answer.subprotocol or chosen
            if subprotocol != chosen and (
                refused := query_refused(request, offers, subprotocol, current)
            ):
                return refused  # a resume, and the control's subprotocol is not wsechod.v1
            return dataclasses.replace(answer, subprotocol=subprotocol, identity=identity)
        return None if identity is None and chosen is None else Admitted(chosen, identity)

    return admit


def is_upgrade(request: Request) -> bool:
    return "websocket" in ",".join(request.headers.get_all("Upgrade")).lower()


def query_refused(
    request: Request, offers: list[str], chosen: str | None, settings: Settings
) -> Reply | None:
    """400 for a resume that cannot be (a bad since or epoch, or no wsechod.v1), or, with
    ``require_subprotocol``, for subprotocols offered that are none of ours."""
    if chosen is None and settings.require_subprotocol and (named := subprotocols.named(offers)):
        text = f"bad request: no subprotocol offered is served here ({', '.join(named)[:200]})\n"
        return Reply(http.HTTPStatus.BAD_REQUEST, text, refused="subprotocol")
    try:
        since = history.resume_of(request.path)
    except history.InvalidResume as exc:
        return Reply(http.HTTPStatus.BAD_REQUEST, f"bad request: {exc}\n", refused="query")
    if since is not None and chosen != history.V1:
        text = "bad request: since and epoch need the wsechod.v1 subprotocol (relay mode)\n"
        return Reply(http.HTTPStatus.BAD_REQUEST, text, refused="query")
    return None


def origin_refused(request: Request, settings: Settings) -> Reply | None:
    """403 for an upgrade from an origin not in ``allowed_origins`` (or without one, with
    ``require_origin``): browsers send Origin, so this keeps other sites' pages off."""
    sent = request.headers.get_all("Origin")
    if not sent:
        if not settings.require_origin:
            return None
        warn.warning("connection refused", reason="no origin", peer=request.peer)
        return Reply(
            http.HTTPStatus.FORBIDDEN, "an Origin header is required\n", refused="no_origin"
        )
    if not settings.allowed_origins:
        return None
    if len(sent) == 1 and origins.allowed(sent[0], settings.allowed_origins):
        return None
    shown = ", ".join(sent)[:200]
    warn.warning("connection refused", reason="origin", origin=shown, peer=request.peer)
    return Reply(http.HTTPStatus.FORBIDDEN, "origin not allowed\n", refused="origin")


def per_address_refused(state: State, request: Request, settings: Settings) -> Reply | None:
    """503 with Retry-After beyond ``max_connections_per_ip`` from one address group (its
    connections are counted from their accept: this one too)."""
    limit = settings.max_connections_per_ip
    if not limit or not request.group or state.connections_from(request.group) <= limit:
        return None
    warn.warning(
        "connection refused", reason="max_connections_per_ip", limit=limit, client=request.group
    )
    return Reply(
        http.HTTPStatus.SERVICE_UNAVAILABLE,
        "too many connections from your address\n",
        {"Retry-After": str(RETRY_AFTER)},
        refused="max_connections_per_ip",
    )


def health(draining: Callable[[], bool], degraded: Callable[[], str | None]) -> Reply:
    """200 while serving, 503 while draining, so load balancers stop sending clients.
    Still 200 when degraded: this instance serves its own clients; the body says what is
    missing."""
    if draining():
        return Reply(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
    why = degraded()
    return Reply(http.HTTPStatus.OK, "ok\n" if why is None else f"degraded: {why}\n")
