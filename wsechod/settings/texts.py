"""What people read of the settings: ``--help``'s line per key, the choices, a default as it
is written, values with credentials masked, ``--check-config``'s rendering, and the sample
config, all from the schema."""

import json
import textwrap
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from wsechod.settings import values
from wsechod.settings.schema import BY_NAME, KEY_NAMES, KEYS, SECTIONS
from wsechod.settings.sources import Loaded


def describe(key: str) -> str:
    """One-line help for a key, shared by ``--help`` and the sample config."""
    return str(BY_NAME[key].metadata["doc"])


def choices(key: str) -> tuple[tuple[str, ...], Mapping[str, str]] | None:
    """The values a choice key takes and its other accepted spellings, for ``--help``."""
    meta = BY_NAME[key].metadata
    return None if meta["choices"] is None else (meta["choices"], meta["aliases"])


def default_text(key: str) -> Any:
    """A key's default as the sample config, the README and ``--help`` write it: the word
    for a default that each machine computes (``backlog = "max"``), else the value."""
    f = BY_NAME[key]
    return f.metadata["default_word"] or f.default


def shown(key: str, value: Any) -> Any:
    """A value as it may be shown to people: with credentials masked."""
    meta = BY_NAME[key].metadata
    if meta["secret"]:
        return "***" if value else value
    if meta["table"]:
        return [{k: v for k, v in asdict(entry).items() if v is not None} for entry in value]
    return values.redact_url(value) if meta["url"] else value


def render(loaded: Loaded) -> str:
    """The effective settings as TOML, each line saying where its value came from."""
    lines = [f"# config file: {loaded.config_path or 'none'}"]
    for key in KEY_NAMES:
        text = json.dumps(shown(key, getattr(loaded.settings, key)))
        lines.append(f"{key} = {text}  # {loaded.sources[key]}")
    return "\n".join(lines)


def note(key: str) -> str:
    """What the sample config and the reference page say of a key ("" if it shares the
    note of the key before it); paragraphs split by a newline."""
    return str(BY_NAME[key].metadata["note"])


def section(key: str) -> str:
    return str(BY_NAME[key].metadata["section"])


SAMPLE_HEAD = """\
wsechod configuration (TOML). Copy to /etc/wsechod/wsechod.toml.

Every key here can also be set with an environment variable WSECHOD_<KEY> (upper case)
or a command-line flag --<key-with-dashes>. Flags win over the environment, which wins
over this file, which wins over the built-in defaults shown below (all commented out).
`wsechod --check-config` prints the effective values and where each one came from.
(This file is made from the settings' schema: `wsechod --print-config-sample`.)"""
WIDTH = 90  # the sample's lines, comment sign included


def sample() -> str:
    """The sample config: every key, commented out at its default, under its section, after
    its note (``wsechod --print-config-sample``, and etc/wsechod.toml)."""
    lines = ["# " + line if line else "#" for line in SAMPLE_HEAD.splitlines()]
    for name in SECTIONS:
        lines += ["", f"# --- {name} ".ljust(WIDTH, "-")]
        for f in KEYS:
            if f.metadata["section"] != name:
                continue
            for paragraph in note(f.name).split("\n") if note(f.name) else ():
                if paragraph.startswith("For example"):  # an example keeps its own line
                    lines.append("# " + paragraph)
                elif paragraph.startswith("    "):  # a block of TOML, as it is written
                    lines.append("# " + paragraph[4:])
                else:
                    lines += textwrap.wrap(
                        paragraph, WIDTH - 2, initial_indent="# ", subsequent_indent="# "
                    )
            if not f.metadata["table"]:  # tables are shown by their note's example
                lines.append(f"# {f.name} = {_toml(default_text(f.name))}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A default as TOML writes it (an empty tuple is an array)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value)
