"""MkDocs hook (mkdocs.yml, ``hooks:``): the configuration reference, generated from the
settings schema each time the site is built, so that it cannot drift from the code.

docs/configuration.md holds the prose and a line ``<!-- settings reference -->``, which
this hook replaces: a table of every key, then one entry per key (its type, default, flag,
environment variable, allowed values, whether a reload applies it, its description and
its note), in the schema's sections, as the sample config (``wsechod
--print-config-sample``) sets them out. It reads what ``--help`` and the sample are made
from: the public helpers of ``wsechod.settings``.
"""

import json
import re
import typing
from typing import Any

from wsechod import settings

MARKER = "<!-- settings reference -->"
TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    tuple[str, ...]: "list of strings",
}
TABLE_TYPE = "array of tables"
# Keys written in descriptions (only those with an underscore: "port" or "mode" there are
# words) become links to their entries.
_KEY_IN_TEXT = re.compile(r"\b(" + "|".join(k for k in settings.KEY_NAMES if "_" in k) + r")\b")


def on_page_markdown(markdown: str, /, **_: object) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference(groups()))


def groups() -> list[tuple[str, list[str]]]:
    """The schema's sections and, in each, its keys, in the schema's order."""
    return [
        (title, [key for key in settings.KEY_NAMES if settings.section(key) == title])
        for title in settings.SECTIONS
    ]


def reference(groups: list[tuple[str, list[str]]]) -> str:
    kinds = typing.get_type_hints(settings.Settings)
    rows = [
        f"| [`{key}`](#{key}) | `{toml(settings.default_text(key))}` | {restart(key, short=True)} |"
        for _, keys in groups
        for key in keys
    ]
    parts = ["| key | default | on reload |", "|---|---|---|", *rows, ""]
    for title, keys in groups:
        parts += [f"### {title}", ""]
        parts += [entry(key, kinds[key]) for key in keys]
    return "\n".join(parts)


def entry(key: str, kind: Any) -> str:
    flag, env = f"`{settings.flag_name(key)}`", f"`{settings.env_name(key)}`"
    if key in settings.SECRET_KEYS:
        flag = "none (a command line is visible to every user of the machine)"
    if key in settings.TABLE_KEYS:
        flag, env = "none", "none: `[[" + key + "]]` tables in the config file only"
    elif kind is bool:
        flag += f", `--no-{settings.flag_name(key)[2:]}`"
    elif kind == tuple[str, ...]:
        flag += " (repeatable, or comma-separated)"
        env += " (comma-separated)"
    default = toml(settings.default_text(key))
    facts = [
        f"- Type: {TABLE_TYPE if key in settings.TABLE_KEYS else TYPES.get(kind, str(kind))}; "
        f"default: `{key} = {default}`",
        f"- Flag: {flag}; environment: {env}",
    ]
    allowed = settings.choices(key)
    if allowed is not None:
        values, aliases = allowed
        shown = ", ".join(f"`{v}`" for v in values)
        facts.append(f"- Values: {shown}, in any case{also(values, aliases)}")
    facts.append(f"- On reload: {restart(key, short=False)}")
    heading = f"#### `{key}` {{#{key}}}"
    note = notes(settings.note(key))
    body = [prose(settings.describe(key)), "", *facts, ""]
    return "\n".join([heading, "", *body, *(f"{n}\n" for n in note if n)])


def notes(text: str) -> list[str]:
    """A note's paragraphs as Markdown; lines indented by four spaces are TOML, shown as
    a code block."""
    out: list[str] = []
    for paragraph in text.split("\n"):
        if paragraph.startswith("    "):
            if out and out[-1].startswith("```toml"):
                out[-1] = out[-1][: -len("```")] + paragraph[4:] + "\n```"
            else:
                out.append("```toml\n" + paragraph[4:] + "\n```")
        else:
            out.append(prose(paragraph, sentence=False))
    return out


def also(values: tuple[str, ...], aliases: typing.Mapping[str, str]) -> str:
    """Other accepted spellings, per value: ``(also: `warn` for `warning`; ...)``."""
    spelled = [
        f"{', '.join(f'`{a}`' for a, to in aliases.items() if to == v)} for `{v}`"
        for v in values
        if v in aliases.values()
    ]
    return f" (also: {'; '.join(spelled)})" if spelled else ""


def restart(key: str, *, short: bool) -> str:
    """What a reload (SIGHUP) does with a new value of ``key``."""
    if key in settings.RESTART_KEYS:
        return "needs a restart" if short else "kept by a reload: needs a restart"
    return "applied" if short else "applied by a reload"


def toml(value: Any) -> str:
    """A default as TOML writes it (the sample's ``# key = value`` lines)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def prose(description: str, *, sentence: bool = True) -> str:
    """A schema description (made a sentence) or a note's paragraph as Markdown: special
    characters escaped, other keys linked to their entries."""
    if not description:
        return ""
    text = description[0].upper() + description[1:] + "." if sentence else description
    pieces = _KEY_IN_TEXT.split(text)  # odd indexes: the keys
    return "".join(
        f"[`{piece}`](#{piece})" if i % 2 else re.sub(r"([\\`*_\[\]<>])", r"\\\1", piece)
        for i, piece in enumerate(pieces)
    )
