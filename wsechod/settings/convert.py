"""A value from a source, turned into its key's type and check_value: TOML values have types
of their own (``port = "8080"`` is a string: most likely a mistake), flags and variables
are strings to parse, values from a program are parse_text like TOML's but advised in Python's
terms. Every failure is one line naming the key, the value and its source."""

import contextlib
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from typing import Any

from wsechod.settings import values
from wsechod.settings.schema import BY_NAME, SettingsError


def word_of(key: str, raw: Any) -> str | None:
    """The word ``raw`` is, if it is one of the key's ``words``."""
    words = BY_NAME[key].metadata["words"]
    word = raw.strip().lower() if isinstance(raw, str) else None
    return word if word in words else None


def source_of(key: str, raw: Any, where: str) -> str:
    """Where a value came from; a word says what it was: ``--workers (auto)``."""
    word = word_of(key, raw)
    return where if word is None else f"{where} ({word})"


def convert(key: str, raw: Any, source: str, *, text: bool, program: bool = False) -> Any:
    """Turn a TOML value (``text`` False: it must have the key's type already) or an
    env/CLI string (``text`` True: parsed) into the key's type, then check its range.
    ``program``: the value came from a Python program, whose author wants Python advice."""
    f = BY_NAME[key]
    if f.metadata["table"]:
        return _table(key, raw, source, text=text)
    kind = typing.get_origin(f.type) or f.type  # tuple[str, ...]: a list of strings
    assert isinstance(kind, type)
    words = f.metadata["words"]
    word = word_of(key, raw)
    try:
        try:
            if word is not None:
                value = words[word]()
            else:
                value = parse_text(kind, raw) if text else native(kind, raw, key if program else "")
        except ValueError as exc:  # not of the key's type: say which words it also takes
            also = f" (or {', '.join(words)})" if words else ""
            raise ValueError(f"{exc}{also}") from None
        return check_value(f.metadata, value)
    except ValueError as exc:
        shown = values.redact_url(raw) if f.metadata["url"] and isinstance(raw, str) else raw
        if f.metadata["secret"]:
            shown = "***"
        raise SettingsError(f"invalid {key} {shown!r} (from {source}): {exc}") from None


def _table(key: str, raw: Any, source: str, *, text: bool) -> Any:
    """An array of tables (``[[channel]]``): from the config file (or a program) only."""
    if text:
        raise SettingsError(
            f"invalid {key} (from {source}): set in the config file only, as [[{key}]] tables"
        )
    try:
        return BY_NAME[key].metadata["table"](raw)
    except ValueError as exc:
        raise SettingsError(f"invalid {key} (from {source}): {exc}") from None


_INT = r"[+-]?[0-9]+"
_FLOAT = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"


def parse_text(kind: type, raw: Any) -> Any:
    """A string from a flag or an environment variable, parsed as the key's type. Lists are
    comma-separated (a repeated flag arrives joined by commas)."""
    if kind is tuple:
        return tuple(e.strip() for e in raw.split(",") if e.strip())
    if kind is bool:
        value = values.boolean(raw)
        if value is None:
            raise ValueError("expected true or false")
        return value
    raw = raw.strip()
    if kind is str:
        return raw
    # Plain ASCII numbers only: Python would also take "8_0" and other scripts' digits.
    if not re.fullmatch(_INT if kind is int else _FLOAT, raw):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}")
    return kind(raw)


def native(kind: type, raw: Any, python: str = "") -> Any:
    """A TOML value, which has a type of its own: port = "8080" is a string, not a port
    (a quoted number or a "yes" is most likely a mistake that would hide another). With
    ``python`` (the key), a value from a program: the same rule, said in Python's terms."""
    if kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if kind is tuple:  # a list of strings: a TOML array
        if isinstance(raw, list) and all(isinstance(e, str) for e in raw):
            return tuple(raw)
        if python:
            hint = f" (in Python: {python}=[{raw!r}])" if isinstance(raw, str) else ""
            raise ValueError(f"expected a list of strings{hint}")
        hint = f" (TOML: write [{json.dumps(raw)}])" if isinstance(raw, str) else ""
        raise ValueError(f"expected an array of strings{hint}")
    if isinstance(raw, kind) and (kind is bool or not isinstance(raw, bool)):
        return raw
    hint = ""
    if isinstance(raw, str) and kind is not str:
        with contextlib.suppress(ValueError):
            value = parse_text(kind, raw)
            if python:
                hint = f" (in Python: {python}={value!r}, without quotes)"
            else:
                hint = f" (TOML: write {json.dumps(value)} without quotes)"
    raise ValueError(f"expected {kind.__name__}, got {type(raw).__name__}{hint}")


def check_value(meta: Mapping[str, Any], value: Any) -> Any:
    if meta["item"] is not None:
        check_value = []
        for entry in value:
            try:
                check_value.append(meta["item"](entry))
            except ValueError as exc:
                raise ValueError(f"entry {entry!r}: {exc}") from None
        value = tuple(check_value)
    if meta.get("url"):
        values.check_broker_url(value)
    if meta["check"] is not None:
        value = meta["check"](value)
    if isinstance(value, tuple):
        return value
    if meta["path"] is not None and value and value not in meta["path"]:
        value = os.path.abspath(os.path.expanduser(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if meta["choices"] is not None:
        value = value.strip().lower()
        value = meta["aliases"].get(value, value)
        if value not in meta["choices"]:
            raise ValueError("must be one of " + ", ".join(meta["choices"]))
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"must be between {lo} and {hi}")
    if lo is not None and value < lo:
        raise ValueError(f"must be at least {lo}")
    return value
