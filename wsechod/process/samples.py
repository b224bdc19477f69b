"""The files an administrator copies into /etc, shipped inside the package so that a
``pip install`` finds them too: ``wsechod --print-config-sample``, ``--print-unit NAME``,
``--print-logrotate-sample``. In the source tree they are links to ``etc/`` and
``systemd/``, the copies ``make install-systemd`` uses, so the two can never differ."""

import sys
from importlib import resources
from pathlib import Path

UNITS = (
    "wsechod.service",
    "wsechod.socket",
    "wsechod@.service",
    "wsechod-activated.service",
    "wsechod-activated.socket",
)
CONFIG = "wsechod.toml"
LOGROTATE = "wsechod.logrotate"
COMMAND_PLACEHOLDER = "@WSECHOD@"


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
