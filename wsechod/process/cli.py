"""Command line: parse, validate, bind, run; and map every failure to an exit status.

Exit statuses: 0 stopped cleanly; 1 could not start or failed while running (port in use,
permission denied, ...), and for ``--check-config`` valid settings that this machine would
not start with (the same status the start would give); 2 the configuration is invalid
(nothing was started).
"""

import argparse
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from wsechod._version import __version__
from wsechod.process import (
    daemon,
    logs,
    paths,
    preflight,
    privileges,
    runner,
    samples,
    systemd,
)
from wsechod.process.logs import LogError
from wsechod.process.pidfile import PidFile, PidFileError
from wsechod.process.privileges import Identity
from wsechod.process.workers import supervisor
from wsechod.runtime import listeners
from wsechod.runtime.tls import TlsError
from wsechod.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    KEYS,
    RETIRED,
    Loaded,
    Notice,
    Settings,
    SettingsError,
    choices,
    default_text,
    describe,
    env_name,
    flag_name,
    load,
    render,
    sample,
)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other wsechod error, instead of the usage block."""
        self.exit(EXIT_CONFIG, f"wsechod: error: {message} (see wsechod --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsechod",
        description="WebSocket echo and relay server daemon. Every setting can also be given "
        "as a key in the config file or as a WSECHOD_<KEY> environment variable; flags win over "
        "the environment, which wins over the file.",
        epilog="secrets, from the environment or the config file only (a command line is "
        "visible to every user of the machine): "
        + "; ".join(f"{env_name(f.name)}: {describe(f.name)}" for f in KEYS if f.metadata["secret"])
        + ". Tables, in the config file only: "
        + "; ".join(f"[[{f.name}]]: {describe(f.name)}" for f in KEYS if f.metadata["table"]),
    )
    parser.add_argument("--version", action="version", version=f"wsechod {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML config file (env {CONFIG_ENV}; default {DEFAULT_CONFIG} if it exists; "
        "'' for none)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings, print the effective values and their sources, check "
        "that this machine would start with them (host, log and pidfile directories, "
        "syslog), and exit: 0 fine, 1 this machine would not start, 2 invalid",
    )
    parser.add_argument(
        "--print-config-sample",
        action="store_true",
        help="print the sample config file (every key, commented) and exit",
    )
    parser.add_argument(
        "--print-unit",
        metavar="NAME",
        choices=samples.UNITS,
        help="print a systemd unit, with ExecStart pointing at this wsechod, and exit: "
        + ", ".join(samples.UNITS),
    )
    parser.add_argument(
        "--print-logrotate-sample",
        action="store_true",
        help="print the sample logrotate rules for a daemon's log file and exit",
    )
    group = parser.add_argument_group("settings")
    for key in RETIRED:  # still accepted, so that old command lines start; not shown
        group.add_argument(
            flag_name(key), dest=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    for f in KEYS:
        if f.metadata["secret"] or f.metadata["table"]:
            continue  # a secret: not on a command line, which is public; tables: file only
        allowed = choices(f.name)
        values = "" if allowed is None else "; one of: " + ", ".join(allowed[0])
        if allowed and allowed[1]:
            spellings = {v: [a for a, t in allowed[1].items() if t == v] for v in allowed[0]}
            values += (
                " (also: "
                + "; ".join(f"{', '.join(a)} for {v}" for v, a in spellings.items() if a)
                + ")"
            )
        default = default_text(f.name)
        default = list(default) if isinstance(default, tuple) else default
        help_text = f"{describe(f.name)}{values} (env {env_name(f.name)}; default: {default!r})"
        if f.type is bool:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        elif isinstance(f.default, tuple):  # a list: the flag may be repeated
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=argparse.SUPPRESS,
                action="append",
                metavar=f.name.upper(),
                help=help_text + "; repeatable, or comma-separated",
            )
        else:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=help_text,
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    runner.catch_early_signals()
    args = vars(build_parser().parse_args(argv))
    for key, value in args.items():  # a repeated flag: its values, as the environment has them
        if isinstance(value, list):
            args[key] = ",".join(value)
    config = args.pop("config")
    if config:  # read again on a reload, after a daemon has moved to /
        config = os.path.abspath(config)
    check_only = args.pop("check_config")
    printed = _sample(
        args.pop("print_config_sample"), args.pop("print_unit"), args.pop("print_logrotate_sample")
    )
    if printed is not None:
        print(printed, end="")
        return EXIT_OK
    try:
        loaded = load(args, os.environ, config)
        identity = privileges.resolve(loaded.settings)
        owner = privileges.socket_owner(
            loaded.settings, identity, loaded.sources["unix_socket_owner"]
        )
    except SettingsError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if check_only:
        return _check(loaded, identity, owner)
    reread = functools.partial(load, args, os.environ, config, reloading=True)
    return _start(loaded, identity, owner, reread)


def _sample(config: bool, unit: str | None, logrotate: bool) -> str | None:
    """The shipped file a --print-* flag asks for, or None (start normally)."""
    if config:
        return sample()
    if unit is not None:
        printed = samples.unit(unit)
        for problem in samples.unit_problems(printed, samples.needed()):
            print(f"wsechod: warning: {unit}: {problem}", file=sys.stderr)
        return printed
    if logrotate:
        return samples.text(samples.LOGROTATE)
    return None


def _check(loaded: Loaded, identity: Identity | None, socket_owner: tuple[int, int] | None) -> int:
    """--check-config: the settings and their sources on stdout; warnings, and whatever
    would stop a start on this machine, one line each on stderr."""
    print(render(loaded))
    activation = systemd.describe_activation()
    print(f"# listening sockets: {activation or _listeners(loaded, socket_owner)}", flush=True)
    for notice in loaded.notices:
        print(f"wsechod: warning: {notice.message}", file=sys.stderr)
    found = preflight.problems(loaded.settings, identity, socket_owner)
    for problem in found:
        _fail(problem, EXIT_FAILURE)
    return EXIT_FAILURE if found else EXIT_OK


def _listeners(loaded: Loaded, socket_owner: tuple[int, int] | None) -> str:
    """The effective listeners, for --check-config."""
    settings = loaded.settings
    where = listeners.addresses(settings)
    text = ", ".join(listeners.describe(address) for address in where)
    if any(address.path.startswith("/") for address in where):
        owner = "unchanged" if socket_owner is None else privileges.describe_owner(*socket_owner)
        text += f" (unix socket files: mode {settings.unix_socket_mode}, owner {owner})"
    return text


def _start(
    loaded: Loaded,
    identity: Identity | None,
    socket_owner: tuple[int, int] | None,
    reread: Callable[[], Loaded],
) -> int:
    """Bind, check the pidfile, then serve here or in a detached daemon.

    Everything up to the fork reports on the terminal; the daemon reports through
    ``daemon.detach``'s pipe, so the operator sees the same one-line errors either way.
    """
    settings = loaded.settings
    logs.configure(settings)
    owner = None if identity is None else (identity.uid, identity.gid)
    try:
        inherited = systemd.listen_fds()
        if inherited:
            bound = listeners.Bound.inherited(inherited)
        else:
            bound = _bind(settings, owner, socket_owner)
    except (listeners.BindError, systemd.ActivationError) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    detached = False
    try:
        pidfile = PidFile(Path(settings.pidfile)) if settings.pidfile else None
        if pidfile is not None:
            pidfile.check(owner)
        logs.prepare(settings, owner)
        serve = functools.partial(
            _serve, loaded, bound, pidfile, handoff=bool(inherited), reread=reread
        )
        if settings.daemon:
            detached = True  # from here on the socket files are the daemon's to remove
            return daemon.detach(bound.sockets, pidfile, identity, serve)
        if identity is not None:
            identity.drop()
        with pidfile or contextlib.nullcontext():
            return serve(None)
    except (PidFileError, LogError) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_FAILURE)
    finally:
        bound.close()
        if not detached:
            bound.remove_files()


def _bind(
    settings: Settings, owner: tuple[int, int] | None, socket_owner: tuple[int, int] | None
) -> listeners.Bound:
    """Bind what the settings ask for; a unix socket's missing directory is made first,
    owned by ``owner`` like the pidfile's, so the server can remove the socket at exit."""
    where = listeners.addresses(settings)
    for address in where:
        if address.path.startswith("/"):
            directory = Path(address.path).parent
            try:
                paths.make_directory(directory, owner)
            except OSError as exc:
                raise listeners.BindError(f"cannot create {directory}: {exc.strerror}") from None
    return listeners.bind(
        where,
        mode=int(settings.unix_socket_mode, 8),
        owner=socket_owner,
        copies=settings.workers,
        backlog=settings.backlog,
    )


def _serve(
    loaded: Loaded,
    bound: listeners.Bound,
    pidfile: PidFile | None,
    on_ready: Callable[[], None] | None,
    *,
    handoff: bool,
    reread: Callable[[], Loaded],
) -> int:
    """The part that runs as the final user, in the foreground or in the daemon."""
    try:
        return _serve_sockets(loaded, bound, pidfile, on_ready, handoff=handoff, reread=reread)
    finally:
        bound.close()
        for path, why in bound.remove_files():
            logs.log.warning("cannot remove unix socket", path=path, error=why)


def _serve_sockets(
    loaded: Loaded,
    bound: listeners.Bound,
    pidfile: PidFile | None,
    on_ready: Callable[[], None] | None,
    *,
    handoff: bool,
    reread: Callable[[], Loaded],
) -> int:
    settings = loaded.settings
    logs.use_destination(settings)
    _log_notices(loaded.notices)
    if pidfile is not None and pidfile.stale_pid is not None:
        logs.log.warning(
            "stale pidfile taken over", pidfile=settings.pidfile, pid=pidfile.stale_pid
        )
    for path in bound.replaced:
        logs.log.warning("stale unix socket replaced", path=path)
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        if on_ready is not None:
            on_ready()

    try:
        if settings.workers > 1:
            return supervisor.run(settings, bound, ready, handoff, reread)
        return runner.run(settings, bound.listeners(), ready, handoff, reread)
    except (TlsError, supervisor.WorkerError) as exc:  # TLS: readable as root, not as user
        if on_ready is not None and not started:
            raise
        return _fail(str(exc), EXIT_FAILURE)
    except Exception:
        logs.log.exception("crashed")
        if on_ready is not None and not started:
            raise  # a daemon that never became ready: its launcher must say why
        return EXIT_FAILURE


def _log_notices(notices: Sequence[Notice]) -> None:
    """Warnings about the settings, in the log the operator reads (after the switch to the
    log file: a daemon's terminal is gone by now)."""
    for notice in notices:
        logs.log.warning(notice.event, **notice.fields)


def _fail(message: str, status: int) -> int:
    # Under systemd, the journal files it as an error (journalctl -p err).
    prefix = f"<{logs.priority(logging.ERROR)}>" if logs.on_journal() else ""
    print(f"{prefix}wsechod: error: {message}", file=sys.stderr)
    return status
