"""The documentation: the site builds with --strict (its links and anchors checked), its
configuration reference lists every key of the settings schema, and what the README says
of settings and where it links to is right. (What a new user pastes from the README and
the docs is run against a real server in test_readme.py.)"""

import html
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import clean_env
from wsechod.settings import (
    KEY_NAMES,
    RESTART_KEYS,
    SECRET_KEYS,
    TABLE_KEYS,
    default_text,
    describe,
    env_name,
    flag_name,
)

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def text_of(page: str) -> str:
    """HTML as the reader sees it: no tags, entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())


def written(value: Any) -> Any:
    """A default as the README's table writes it: a list as TOML's, a float without .0."""
    if isinstance(value, float):
        return f"{value:g}"
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.timeout(180)
def test_the_site_builds_and_its_reference_lists_every_key(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, env=clean_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True,
        timeout=170, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    page = (tmp_path / "configuration" / "index.html").read_text()
    for key in KEY_NAMES:
        assert f'id="{key}"' in page, key
        entry = text_of(page.partition(f'id="{key}"')[2].partition("<h")[0])
        if key in TABLE_KEYS:
            assert f"[[{key}]] tables in the config file only" in entry, entry
        elif key in SECRET_KEYS:
            assert "Flag: none" in entry and env_name(key) in entry, entry
        else:
            assert flag_name(key) in entry and env_name(key) in entry, entry
        default = json.dumps(written(default_text(key)) if key != "backlog" else "max")
        assert f"default: {key} = " in entry, entry
        assert ("needs a restart" in entry) == (key in RESTART_KEYS), entry
        assert describe(key)[1:] in entry, entry
        assert default.strip('"') in entry, entry
    # What the pages include from elsewhere: the README's HTTP answers, the changelog.
    assert "503 server is at capacity" in text_of((tmp_path / "echo" / "index.html").read_text())
    assert "Unreleased" in text_of((tmp_path / "changelog" / "index.html").read_text())


def slugify(title: str) -> str:
    """Python-Markdown's (MkDocs') heading ids; GitHub's are the same for these titles."""
    value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def headings(markdown: str) -> set[str]:
    """The anchors of a Markdown file's headings, as MkDocs (and, for these, GitHub) make
    them: an explicit {#id}, else the heading's text slugified."""
    found = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)  # no "# comment" lines
    for title in re.findall(r"^#+ (.+)$", prose, re.M):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", title)
        found.add(explicit.group(1) if explicit else slugify(title.replace("`", "")))
    return found


@pytest.mark.unit
def test_the_readmes_links_lead_to_files_and_headings() -> None:
    """Relative links, so that they work on a code host as in a checkout."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"\w+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), link
        if anchor:
            assert anchor in headings(target.read_text()), link


@pytest.mark.unit
def test_the_readmes_settings_are_the_schemas() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, re.M)
    assert len(rows) >= 5
    for key, default in rows:
        assert key in KEY_NAMES, key
        assert default == str(written(default_text(key))), key


@pytest.mark.unit
def test_the_reload_section_names_every_key_that_needs_a_restart() -> None:
    operate = (ROOT / "docs" / "operate.md").read_text()
    kept = re.search(r"keeps what needs a restart \((.*?)\)", operate, re.S)
    assert kept is not None
    assert set(re.findall(r"`(\w+)`", kept.group(1))) == RESTART_KEYS


@pytest.mark.unit
def test_every_page_is_in_the_navigation_and_the_readme_points_to_each() -> None:
    """mkdocs --strict fails on a page left out of the navigation; the README's list of
    pages is checked here."""
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md", "changelog.md"}
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert pages <= linked, pages - linked
