"""wsechod: a WebSocket echo and relay server daemon, and the same server embedded in a
program (``serve_in_thread``, ``running``: see ``wsechod.runtime.embedded``)."""

from wsechod._version import __version__

# Not typing's: the command imports this package before it can handle signals (see
# process/entry.py), and typing alone would take several milliseconds of that window.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "BindError",
    "DrainReport",
    "Server",
    "SettingsError",
    "ThreadedServer",
    "__version__",
    "running",
    "serve_in_thread",
]

if TYPE_CHECKING:
    from wsechod.runtime.embedded import (
        BindError,
        DrainReport,
        Server,
        SettingsError,
        ThreadedServer,
        running,
        serve_in_thread,
    )


def __getattr__(name: str) -> "Any":
    """The embedding API, imported on first use: ``import wsechod`` (the pytest plugin,
    ``--version``) stays light, and no submodule is half-imported through this one."""
    if name in __all__:
        from wsechod.runtime import embedded  # noqa: PLC0415

        return getattr(embedded, name)
    raise AttributeError(f"module 'wsechod' has no attribute {name!r}")
