"""The files an administrator copies into /etc, shipped inside the package so that a
``pip install`` finds them too: ``wsechod --print-config-sample``, ``--print-unit NAME``,
``--print-logrotate-sample``. In the source tree they are links to ``etc/`` and
``systemd/``, the copies ``make install-systemd`` uses, so the two can never differ. (The
sample config is made from the settings' schema: ``wsechod.settings.sample``; etc/ holds
a copy that a test keeps equal.)"""

import stat
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

UNITS = (
    "wsechod.service",
    "wsechod.socket",
    "wsechod@.service",
    "wsechod-activated.service",
    "wsechod-activated.socket",
)
LOGROTATE = "wsechod.logrotate"
COMMAND_PLACEHOLDER = "@WSECHOD@"
# What a unit's sandboxing hides from its service: the setting, the values that hide, the
# directories hidden, and the value that would not (DynamicUser=yes implies PrivateTmp=yes).
YES = ("yes", "true", "on", "1")
HIDING = (
    ("ProtectHome", (*YES, "tmpfs"), ("/home", "/root", "/run/user"), "read-only"),
    ("PrivateTmp", YES, ("/tmp", "/var/tmp"), "no"),
)


def text(name: str) -> str:
    return (resources.files("wsechod") / "data" / name).read_text(encoding="utf-8")


def command() -> str:
    """How systemd should start this very wsechod: the console script that is running, or
    this interpreter with ``-m wsechod``."""
    script = Path(sys.argv[0])
    if script.name == "wsechod" and script.is_file():
        return str(script.absolute())
    return f"{sys.executable} -m wsechod"


def unit(name: str) -> str:
    """A unit file with ExecStart pointing at this wsechod, as ``make install-units``
    writes it."""
    return text(name).replace(COMMAND_PLACEHOLDER, command())


def needed() -> list[tuple[str, Path]]:
    """What the service needs to reach to start this wsechod, each with its part: the
    command (the console script), the interpreter and the package."""
    first = command().split(" -m ")[0]
    parts = [("the interpreter", Path(sys.executable)), ("the package", Path(__file__).parents[1])]
    return parts if first == sys.executable else [("the command", Path(first)), *parts]


def unit_problems(unit_text: str, paths: Iterable[tuple[str, Path]]) -> list[str]:
    """Why the service that ``unit_text`` describes could not start from ``paths`` (see
    ``needed``; a venv under /tmp or /home fails with status 203/EXEC): a line for each
    setting that hides one of them, or for a directory on the way that the transient user
    of DynamicUser=yes may not enter."""
    settings: dict[str, str] = {}
    for line in unit_text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith(("#", ";")):
            settings[key.strip()] = value.strip().lower()  # the last one counts
    dynamic = settings.get("DynamicUser") in YES
    # As named, and where links lead: systemd follows them inside the sandbox.
    candidates = [
        (part, q) for part, p in paths for q in dict.fromkeys((p.absolute(), p.resolve()))
    ]
    problems: list[str] = []
    hidden: set[Path] = set()
    for setting, values, directories, visible in HIDING:
        value = "yes" if setting == "PrivateTmp" and dynamic else settings.get(setting, "no")
        if value not in values:
            continue
        found = [(part, path, d) for part, path in candidates for d in directories
                 if path.is_relative_to(d)]  # fmt: skip
        hidden.update(path for _, path, _ in found)
        if not found:
            continue
        part, path, directory = found[0]
        where = f"{', '.join(directories[:-1])} and {directories[-1]}"
        if part == "the interpreter":
            fix = (f"use a Python installed outside {where}, e.g. with make install "
                   "PYTHON=/usr/bin/python3 (/opt/wsechod)")  # fmt: skip
        else:
            fix = f"install wsechod outside {where}, e.g. with make install (/opt/wsechod)"
        if setting == "PrivateTmp" and dynamic:
            fix += "; DynamicUser=yes implies PrivateTmp=yes"
        elif not dynamic or _closed_to_others(path) is None:  # visible would be enough
            fix += f", or set {setting}={visible} in the unit"
        problems.append(
            f"{part} {path} is under {directory}, which {setting}={value} in this unit "
            f"hides from the service: it would {_failure(part)}; {fix}"
        )
    for part, path in candidates:
        closed = _closed_to_others(path) if dynamic and path not in hidden else None
        if closed is not None:
            mode = closed.stat().st_mode & 0o777
            problems.append(
                f"{part} {path} is out of reach of the transient user of DynamicUser=yes "
                f"({closed} has mode {mode:o}): it would {_failure(part)}; make the way "
                "readable by others (chmod o+rx), or install wsechod elsewhere"
            )
            break
    return problems


def _failure(part: str) -> str:
    """What systemd reports when the service cannot reach ``part``."""
    return "fail to import wsechod" if part == "the package" else "fail with status 203/EXEC"


def _closed_to_others(path: Path) -> Path | None:
    """The first of the directories down to ``path``, and ``path``, that a user who owns
    none of them and is in none of their groups cannot use; None if it can reach ``path``.
    Directories on the way need x; the last one r and x (the import system lists it); a
    file r, and x if it is a program."""
    for part in [*reversed(path.parents), path]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return None  # not there: nothing to say
        if part != path:
            need = stat.S_IXOTH
        elif stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
            need = stat.S_IROTH | stat.S_IXOTH
        else:
            need = stat.S_IROTH
        if mode & need != need:
            return part
    return None
