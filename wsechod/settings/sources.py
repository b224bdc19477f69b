"""Where settings come from, merged: defaults < the TOML file < ``WSECHOD_*`` variables <
flags < values a program gives (the embedded server). Kubernetes' service-link variables,
which happen to start with ``WSECHOD_``, are set aside; retired keys are accepted with a
notice; an unknown key is an error that suggests the closest one."""

import difflib
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsechod.settings import checks
from wsechod.settings.checks import Notice
from wsechod.settings.convert import convert, source_of
from wsechod.settings.schema import (
    BY_NAME,
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ENV_PREFIX,
    KEY_NAMES,
    RETIRED,
    Settings,
    SettingsError,
    flag_name,
)

# Kubernetes gives every pod variables for each Service of its namespace ("service links");
# a Service named wsechod (or wsechod-something) makes them start with WSECHOD_. They are
# not settings, and must not stop a pod from starting.
_SERVICE_LINK = re.compile(
    r"(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings plus where each value came from, for ``--check-config`` and error messages."""

    settings: Settings
    sources: Mapping[str, str]
    config_path: Path | None
    notices: tuple[Notice, ...] = ()


def load(
    cli: Mapping[str, str],
    environ: Mapping[str, str],
    config: str | None,
    *,
    given: Mapping[str, Any] | None = None,
    given_by: str = "",
    reloading: bool = False,
) -> Loaded:
    """Merge the sources; ``cli`` holds only the flags that were given, as strings.
    ``given``: values from a program (keyword arguments of ``given_by``, which names them
    in errors), typed and checked like the TOML file's; they win over every other source.
    ``reloading``: read again for a reload, on a running server: a config file that is not
    a regular file (a pipe, which would hold the server until someone writes to it) is
    refused; at start one may be read (``--config <(...)``).
    """
    config_path = find_config(config, environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in KEY_NAMES}
    retired: dict[str, str] = {}

    if config_path is not None:
        where = str(config_path)
        for key, raw in read_toml(config_path, regular_only=reloading).items():
            if key in RETIRED:
                retired[key] = where
                continue
            check_known(key, f"in {where}")
            values[key] = convert(key, raw, where, text=False)  # TOML values are typed
            sources[key] = source_of(key, raw, where)

    ignored: list[str] = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if is_service_link(var, raw):
            ignored.append(var)
            continue
        if key in RETIRED:
            retired[key] = var
            continue
        check_known(key, f"from environment variable {var}")
        values[key] = convert(key, raw, var, text=True)
        sources[key] = source_of(key, raw, var)

    for key, raw in cli.items():
        if key in RETIRED:
            retired[key] = flag_name(key)
            continue
        values[key] = convert(key, raw, flag_name(key), text=True)
        sources[key] = source_of(key, raw, flag_name(key))

    for key, raw in (given or {}).items():
        if key in RETIRED:
            retired[key] = given_by
            continue
        check_known(key, f"passed to {given_by}")
        typed = list(raw) if isinstance(raw, tuple) else raw  # a Python list may be a tuple
        values[key] = convert(key, typed, given_by, text=False, program=True)
        sources[key] = given_by

    settings = Settings(**values)
    checks.check_workers(settings, sources)
    checks.check_broker_package(settings, sources)
    checks.check_redis(settings, sources)
    checks.check_tls(settings, sources)
    checks.check_auth(settings, sources)
    checks.check_history(settings, sources)
    notices = [
        *checks.service_link_notice(ignored),
        *checks.retired_notice(retired),
        *checks.echo_mode_notice(settings),
        *checks.listen_notice(settings, sources),
        *checks.auth_notice(settings, sources),
    ]
    return Loaded(settings, sources, config_path, tuple(notices))


def is_service_link(var: str, raw: str) -> bool:
    """A Kubernetes service-link variable rather than one of ours (or a typo of ours)."""
    name = var[len(ENV_PREFIX) :]
    if name.lower() in BY_NAME:
        # WSECHOD_PORT is both our port and a Service's address (tcp://10.0.0.7:8765).
        return name == "PORT" and _SERVICE_LINK_URL.fullmatch(raw.strip()) is not None
    if _SERVICE_LINK.fullmatch(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(raw.strip()) is not None


def find_config(config: str | None, environ: Mapping[str, str]) -> Path | None:
    if config is None:
        config = environ.get(CONFIG_ENV)
    if config is None:
        return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    if config == "":
        return None  # an explicit "no config file", e.g. in tests and units
    return Path(config)


def read_toml(path: Path, *, regular_only: bool = False) -> dict[str, Any]:
    try:
        if regular_only and not stat.S_ISREG(path.stat().st_mode):
            raise SettingsError(
                f"cannot read config file {path} on a reload: not a regular file "
                "(a pipe would hold the server until something writes to it)"
            )
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"invalid TOML in {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"invalid TOML in {path}: not UTF-8 at byte {exc.start}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None


def check_known(key: str, where: str) -> None:
    if key in BY_NAME:
        return
    close = difflib.get_close_matches(key, KEY_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SettingsError(f"unknown key {key!r} {where}{hint}")
