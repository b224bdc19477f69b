"""What can only be checked with several keys together (a TLS key needs a certificate,
relay workers need a shared broker, the broker needs its package), and the notices: settings
that are accepted but most likely not what the operator meant."""

import importlib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wsechod.auth import apikeys, keys
from wsechod.runtime import tls
from wsechod.settings import values
from wsechod.settings.schema import (
    BY_NAME,
    RELAY_KEYS,
    RETIRED,
    UNIX_SOCKET_KEYS,
    Settings,
    SettingsError,
)


@dataclass(frozen=True, slots=True)
class Notice:
    """A warning about settings that are accepted but not what the operator may think:
    ``--check-config`` prints ``message``, a start logs ``event`` with ``fields``."""

    message: str
    event: str
    fields: Mapping[str, Any]


def retired_notice(seen: dict[str, str]) -> list[Notice]:
    return [
        Notice(
            f"{key} (from {where}) has no effect any more: {RETIRED[key]}",
            "setting has no effect any more",
            {"key": key, "source": where},
        )
        for key, where in seen.items()
    ]


def service_link_notice(ignored: list[str]) -> list[Notice]:
    if not ignored:
        return []
    names = ", ".join(ignored)
    return [
        Notice(
            f"ignored environment variables that Kubernetes sets for a Service: {names}",
            "kubernetes service variables ignored",
            {"variables": ignored},
        )
    ]


def echo_mode_notice(settings: Settings) -> list[Notice]:
    if settings.mode != "echo":
        return []
    unused = [k for k in RELAY_KEYS if getattr(settings, k) != BY_NAME[k].default]
    if not unused:
        return []
    return [
        Notice(
            f"relay settings have no effect in echo mode: {', '.join(unused)}",
            "settings have no effect in echo mode",
            {"keys": unused},
        )
    ]


def listen_notice(settings: Settings, sources: Mapping[str, str]) -> list[Notice]:
    """``listen`` replaces host and port, and the unix socket keys apply to its unix
    socket files: setting those to no effect is most likely an oversight."""
    reasons: dict[str, str] = {}
    # Redundant rather than ignored when listen has that address (a container image's).
    listed = {(a.host, a.port) for a in map(values.listen_address, settings.listen)}
    if settings.listen and (settings.host, settings.port) not in listed:
        reasons |= {k: "listen replaces host and port" for k in ("host", "port")}
    if not any(entry.startswith("unix:/") for entry in settings.listen):
        reasons |= {k: "no unix socket file in listen" for k in UNIX_SOCKET_KEYS}
    unused = {k: why for k, why in reasons.items() if sources[k] != "default"}
    notices = []
    if unused:
        notices.append(
            Notice(
                "settings have no effect: "
                + ", ".join(f"{k} ({why})" for k, why in unused.items()),
                "settings have no effect",
                {"keys": list(unused), "listen": list(settings.listen)},
            )
        )
    served = set().union(*(values.listen_address(e).roles for e in settings.listen or (":0",)))
    notices += [
        Notice(
            f"no listener has the role {role}: {values.ROLE_SERVES[role]} are served nowhere",
            "role served nowhere",
            {"role": role, "listen": list(settings.listen)},
        )
        for role in ("public", "ops")
        if role not in served
    ]
    return notices


def check_tls(settings: Settings, sources: Mapping[str, str]) -> None:
    """The files are read into a context now, so a missing, unreadable or mismatched one
    stops the start (or a reload) with a line that names it."""
    for key in ("tls_key", "tls_ca"):
        if getattr(settings, key) and not settings.tls_cert:
            raise SettingsError(
                f"invalid {key} {getattr(settings, key)!r} (from {sources[key]}): "
                "needs tls_cert too"
            )
    if not settings.tls_cert:
        return
    try:
        tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except tls.TlsError as exc:
        raise SettingsError(
            f"invalid {exc.key} {exc.path!r} (from {sources[exc.key]}): {exc.reason}"
        ) from None


def check_workers(settings: Settings, sources: Mapping[str, str]) -> None:
    """The memory broker relays within one process: with several, members of one channel
    on different workers would never hear each other."""
    if settings.workers > 1 and settings.mode == "relay" and settings.broker == "memory":
        raise SettingsError(
            f"invalid workers {settings.workers} (from {sources['workers']}): relay mode with "
            "several workers needs a broker they share (broker = redis://...); the memory "
            "broker relays within one process"
        )


def check_broker_package(settings: Settings, sources: Mapping[str, str]) -> None:
    """The Redis broker needs redis-py, an optional extra: say so before anything starts."""
    if settings.mode != "relay" or settings.broker == "memory":
        return
    try:
        importlib.import_module("redis")
    except ImportError:
        raise SettingsError(
            f"invalid broker {values.redact_url(settings.broker)!r} (from {sources['broker']}): "
            "the Redis broker needs the redis package: pip install 'wsechod[redis]'"
        ) from None


def check_redis(settings: Settings, sources: Mapping[str, str]) -> None:
    """Sentinel and Cluster are ways to reach Redis: they need a Redis broker URL (over
    TCP: the nodes' addresses come from Redis), and they exclude each other."""
    if settings.redis_sentinels:
        key, value = "redis_sentinels", ",".join(settings.redis_sentinels)
    elif settings.redis_cluster:
        key, value = "redis_cluster", "true"
    elif settings.redis_sentinel_service:
        key, value = "redis_sentinel_service", settings.redis_sentinel_service
        raise SettingsError(
            f"invalid {key} {value!r} (from {sources[key]}): set redis_sentinels too"
        )
    else:
        return
    why = ""
    if settings.broker == "memory" or settings.broker.startswith("unix:"):
        why = "needs a redis:// or rediss:// broker URL (its credentials and database)"
    elif settings.redis_sentinels and settings.redis_cluster:
        why = "Sentinel and Cluster exclude each other: set one"
    elif settings.redis_sentinels and not settings.redis_sentinel_service:
        why = "needs redis_sentinel_service, the name the sentinels monitor"
    elif settings.redis_cluster and urllib.parse.urlsplit(settings.broker).path not in (
        "",
        "/",
        "/0",
    ):
        why = "a Redis Cluster has database 0 only: use a broker URL without /db"
    if why:
        raise SettingsError(f"invalid {key} {value!r} (from {sources[key]}): {why}")


def check_history(settings: Settings, sources: Mapping[str, str]) -> None:
    """History needs a size and a time to live: one without the other is a mistake."""
    places = [("", settings.history_size, settings.history_ttl)] + [
        (f", [[channel]] {rule.pattern!r}", rule.history_size, rule.history_ttl)
        for rule in settings.channel
    ]
    for where, sized, timed in places:
        size = settings.history_size if sized is None else sized
        ttl = settings.history_ttl if timed is None else timed
        key, value = ("history_ttl", ttl) if size else ("history_size", size)
        source = sources["channel" if where else key]
        if bool(size) != bool(ttl):
            raise SettingsError(
                f"invalid {key} {value!r} (from {source}{where}): history needs both "
                "history_size and history_ttl (or neither)"
            )


AUTH_KEYS = ("jwt_secret_file", "jwt_public_key", "jwt_secret")


def check_auth(settings: Settings, sources: Mapping[str, str]) -> None:
    """Every key file is read and parsed now, so that a missing file, a short secret or a
    public key that does not parse stops the start (or a reload) with a line naming it."""
    for key, kind in (("jwt_secret_file", "secret"), ("jwt_public_key", "public")):
        for entry in getattr(settings, key):
            try:
                keys.load(kind, entry)
            except keys.BadKey as exc:
                raise SettingsError(
                    f"invalid {key} {entry!r} (from {sources[key]}): {exc}"
                ) from None
    if settings.jwt_secret:
        try:
            keys.secret(None, settings.jwt_secret.encode(), "jwt_secret")
        except keys.BadKey as exc:
            raise SettingsError(
                f"invalid jwt_secret '***' (from {sources['jwt_secret']}): {exc}"
            ) from None
    try:
        ring = keys.ring(settings.jwt_secret_file, settings.jwt_public_key, settings.jwt_secret)
    except keys.BadKey as exc:
        key = "jwt_public_key" if settings.jwt_public_key else "jwt_secret_file"
        raise SettingsError(f"invalid {key} (from {sources[key]}): {exc}") from None
    if settings.api_key_file:
        try:
            apikeys.load(settings.api_key_file)
        except apikeys.BadKeyFile as exc:
            raise SettingsError(
                f"invalid api_key_file {settings.api_key_file!r} "
                f"(from {sources['api_key_file']}): {exc}"
            ) from None
    if settings.auth == "jwt" and not ring:
        raise SettingsError(
            f"invalid auth 'jwt' (from {sources['auth']}): no key to check tokens with; "
            "set jwt_secret_file, jwt_public_key or jwt_secret"
        )


def auth_notice(settings: Settings, sources: Mapping[str, str]) -> list[Notice]:
    """Keys given while tokens are not asked for: most likely auth was forgotten."""
    if settings.auth != "none":
        return []
    unused = [k for k in AUTH_KEYS if sources[k] != "default"]
    if not unused:
        return []
    return [
        Notice(
            f"settings have no effect: {', '.join(unused)} (auth is none: no token is asked for)",
            "settings have no effect",
            {"keys": unused},
        )
    ]
