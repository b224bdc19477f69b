"""Settings: one frozen object built from defaults < TOML file < WSECHOD_* env < CLI flags.

The package's rooms: ``schema`` declares every key once (its type, default, help, note and
section); ``values`` parses single values (listen entries and roles, networks, URLs);
``convert`` turns what a source gives into a key's type; ``checks`` holds what needs
several keys, and the notices; ``sources`` merges the sources (``load``); ``texts`` makes
what people read of them: ``--help``, ``--check-config`` and the sample config.
Everything that can be checked without touching the network or the file system is checked
here, so a bad value fails before anything binds or detaches.
"""

from wsechod.settings.checks import Notice
from wsechod.settings.schema import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    KEY_NAMES,
    KEYS,
    MAX_WORKERS,
    RELAY_KEYS,
    RESTART_KEYS,
    RETIRED,
    SECRET_KEYS,
    SECTIONS,
    TABLE_KEYS,
    Settings,
    SettingsError,
    changes,
    env_name,
    flag_name,
)
from wsechod.settings.sources import Loaded, load
from wsechod.settings.texts import (
    choices,
    default_text,
    describe,
    note,
    render,
    sample,
    section,
    shown,
)
from wsechod.settings.values import (
    ALL_ROLES,
    ROLES,
    ListenAddress,
    describe_roles,
    kernel_backlog,
    listen_address,
    redact_url,
    roles_of_name,
)

__all__ = [
    "ALL_ROLES",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "KEYS",
    "KEY_NAMES",
    "MAX_WORKERS",
    "RELAY_KEYS",
    "RESTART_KEYS",
    "RETIRED",
    "ROLES",
    "SECRET_KEYS",
    "SECTIONS",
    "TABLE_KEYS",
    "ListenAddress",
    "Loaded",
    "Notice",
    "Settings",
    "SettingsError",
    "changes",
    "choices",
    "default_text",
    "describe",
    "describe_roles",
    "env_name",
    "flag_name",
    "kernel_backlog",
    "listen_address",
    "load",
    "note",
    "redact_url",
    "render",
    "roles_of_name",
    "sample",
    "section",
    "shown",
]
