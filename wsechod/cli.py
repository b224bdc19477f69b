"""Command line: parse, validate, bind, run; and map every failure to an exit status.

Exit statuses: 0 stopped cleanly; 1 could not start or failed while running (port in use,
permission denied, ...); 2 the configuration is invalid (nothing was started).
"""

import argparse
import os
import sys
from collections.abc import Sequence

from wsechod import __version__, logs, runtime, sockets
from wsechod.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    KEYS,
    Loaded,
    SettingsError,
    describe,
    env_name,
    flag_name,
    load,
    render,
)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsechod",
        description="WebSocket echo server daemon. Every setting can also be given as a key "
        "in the config file or as a WSECHOD_<KEY> environment variable; flags win over the "
        "environment, which wins over the file.",
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
        help="validate the settings, print the effective values and their sources, and exit",
    )
    group = parser.add_argument_group("settings")
    for f in KEYS:
        group.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{describe(f.name)} (env {env_name(f.name)}; default: {f.default})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    check_only = args.pop("check_config")
    try:
        loaded = load(args, os.environ, config)
    except SettingsError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if check_only:
        print(render(loaded))
        return EXIT_OK
    return _start(loaded)


def _start(loaded: Loaded) -> int:
    settings = loaded.settings
    logs.configure(settings)
    try:
        listening = sockets.bind(settings.host, settings.port)
    except sockets.BindError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    try:
        return runtime.run(settings, listening)
    except Exception:
        logs.log.exception("crashed")
        return EXIT_FAILURE
    finally:
        for sock in listening:
            sock.close()


def _fail(message: str, status: int) -> int:
    print(f"wsechod: error: {message}", file=sys.stderr)
    return status
