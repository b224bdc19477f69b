"""``--check-config``'s look at the machine: what would stop a start, found without one.

Valid settings can still fail to start: a host name that does not resolve, a log or
pidfile directory that cannot be made or written to, no syslog socket for a daemon.
Nothing is created, bound or locked here: the instance about to be restarted may hold the
port and the pidfile, and checking before a restart must not fail on them. Directories are
made by the starting process (root, with --user), while the files in them are written by
the user it becomes, so writes are checked as that user, in a child that drops root first.
"""

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from wsechod.process import logs, paths, systemd
from wsechod.process.privileges import Identity
from wsechod.runtime import listeners, tls
from wsechod.settings import Settings


def problems(
    settings: Settings, identity: Identity | None, socket_owner: tuple[int, int] | None = None
) -> list[str]:
    """One line per problem, worded like the error the start would print."""
    found: list[str] = []
    if systemd.describe_activation() is None:  # else the configured listeners are not used
        for address in listeners.addresses(settings):
            if not address.path:
                try:
                    listeners.resolve(address.host, address.port)
                except listeners.BindError as exc:
                    found.append(str(exc))
            elif address.path.startswith("/"):
                found += _unix_socket(Path(address.path), socket_owner)
    syslog = logs.syslog_problem(settings)
    if syslog is not None:
        found.append(syslog)
    log_file = logs.log_path(settings)
    pidfile = Path(settings.pidfile) if settings.pidfile else None
    if log_file is not None and (why := paths.cannot_create(log_file.parent)):
        found.append(f"cannot create log directory {log_file.parent}: {why}")
    if pidfile is not None and (why := paths.cannot_create(pidfile.parent)):
        found.append(f"cannot create {pidfile.parent}: {why}")
    found += _as_user(identity, lambda: _writes(log_file, pidfile) + _tls_files(settings))
    return found


def _unix_socket(path: Path, owner: tuple[int, int] | None) -> list[str]:
    """What would stop binding a unix socket file here: its directory, something else at
    its path, an owner this process may not give it. A live socket is not a problem: it
    may be the instance about to be restarted."""
    directory = path.parent
    if not directory.is_dir():
        why = paths.cannot_create(directory)
        return [] if why is None else [f"cannot create {directory}: {why}"]
    if why := paths.unwritable(directory):
        return [f"cannot listen on {path}: {why}"]
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        return [f"cannot listen on {path}: it exists and is not a socket"]
    if owner is not None and os.geteuid() != 0:
        uid, gid = owner
        if uid != os.geteuid() or gid not in (os.getegid(), *os.getgroups()):
            who = f"{uid}:{gid}"
            return [f"cannot give unix socket {path} to {who}: {os.strerror(errno.EPERM)}"]
    return []


def _tls_files(settings: Settings) -> list[str]:
    """The TLS files, read as the user that will read them (at start, and on reloads)."""
    if not settings.tls_cert:
        return []
    try:
        tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except tls.TlsError as exc:
        return [str(exc)]
    return []


def _writes(log_file: Path | None, pidfile: Path | None) -> list[str]:
    """What the running daemon writes: its log file, and its pidfile (a locked temporary
    file renamed into place, so the directory must be writable too)."""
    found = []
    if log_file is not None and (why := paths.cannot_write_file(log_file)):
        found.append(f"cannot open log file {log_file}: {why}")
    if pidfile is not None and pidfile.parent.is_dir():
        if why := paths.unwritable(pidfile.parent):
            found.append(f"cannot write pidfile in {pidfile.parent}: {why}")
        elif pidfile.exists() and (why := paths.unwritable(pidfile, os.R_OK | os.W_OK)):
            found.append(f"cannot open pidfile {pidfile}: {why}")
    return found


def _as_user(identity: Identity | None, check: Callable[[], list[str]]) -> list[str]:
    """Run ``check`` as ``identity`` (in a forked child, since dropping root is for good)."""
    if identity is None:
        return check()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            identity.drop()
            lines = check()
        except Exception as exc:  # report it: the parent must not hang or pass silently
            lines = [f"cannot check as user {identity.name}: {exc}"]
        os.write(write_end, "\n".join(lines).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    os.waitpid(child, 0)
    return output.splitlines()
