"""The command's entry point (the ``wsechod`` console script and ``python -m wsechod``).

A signal that arrives before a handler is installed gets its default action: SIGTERM,
SIGHUP and SIGUSR1 end the process, with no log line, and the import of the whole command
takes longer than a signal may take to come (systemd's reload or stop, a script that starts
then signals). So the signals the command handles are blocked here, first, before any of
the package is imported: they wait, pending, until ``runner.catch_early_signals`` has its
handlers in place and unblocks them. Only the interpreter's own start is left unguarded.

Importing this module runs only the package's two light ``__init__`` modules and imports
only ``signal``: a few milliseconds (tests/test_entry.py measures it against a bare
interpreter that only blocks the signals).
"""

import signal

# The signals the command handles (runner.HANDLED_SIGNALS, which cannot be imported yet):
# stop (SIGTERM, SIGINT) and reload (SIGHUP, SIGUSR1).
EARLY_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})


def main() -> int:
    """Block the handled signals, then import and run the command (which unblocks them
    once its handlers are installed)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, EARLY_SIGNALS)
    from wsechod.process import cli  # noqa: PLC0415  (the point: after the block)

    return cli.main()
