"""The package layout is the architecture: these are its rules, checked on the source.

Data flows one way: settings -> listeners -> (daemon) -> lifecycle -> engine ->
applications -> brokers. The lifecycle and everything below it import nothing of the
process part (so the server can be embedded); applications and brokers know nothing of
websockets (they see the engine's connection interface); the engine knows no application.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # in-process: make check runs it

PACKAGE = Path(__file__).parents[1] / "wsechod"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules(*parts: str) -> list[Path]:
    return sorted(PACKAGE.joinpath(*parts).rglob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(i for i in imports(path) if i.startswith(forbidden))
        if bad:
            out[str(path.relative_to(PACKAGE))] = bad
    return out


def test_nothing_outside_process_imports_process() -> None:
    outside = [p for p in modules() if "process" not in p.relative_to(PACKAGE).parts]
    outside = [p for p in outside if p.name != "__main__.py"]  # the entry point runs it
    assert offending(outside, ("wsechod.process",)) == {}


@pytest.mark.parametrize("room", ["apps", "brokers"])
def test_applications_and_brokers_know_nothing_of_websockets(room: str) -> None:
    assert offending(modules(room), ("websockets",)) == {}


def test_the_engine_knows_no_application_nor_lifecycle() -> None:
    forbidden = (
        "wsechod.apps",
        "wsechod.brokers",
        "wsechod.runtime.lifecycle",
        "wsechod.http.admission",
    )
    assert offending(modules("engine"), forbidden) == {}


def test_the_engine_needs_only_itself_and_two_leaves() -> None:
    """Options in, counts out: no settings, listeners, TLS files or process."""
    allowed = ("wsechod.engine", "wsechod.ratelimit", "wsechod.log", "wsechod._version")
    found = {
        str(path.relative_to(PACKAGE)): sorted(
            i
            for i in imports(path)
            if i.startswith("wsechod") and i != "wsechod" and not i.startswith(allowed)
        )
        for path in modules("engine")
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_the_engine_knows_nothing_of_metrics() -> None:
    """The engine keeps plain counts; /metrics reads them at scrape time, from above."""
    assert offending(modules("engine"), ("wsechod.runtime.metrics", "prometheus_client")) == {}


def test_the_drains_bound_is_computed_in_one_place() -> None:
    """``lifecycle.drain_bound``: the parts of a drain's deadline are named nowhere else
    (the runner, the supervisor and the embedded stop each added them up)."""
    parts = {"HANDSHAKE_GRACE", "BROKER_CLOSE_TIMEOUT"}
    named = {
        str(path.relative_to(PACKAGE))
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if (isinstance(node, ast.Name) and node.id in parts)
        or (isinstance(node, ast.Attribute) and node.attr in parts)
        or (isinstance(node, ast.alias) and node.name in parts)
    }
    assert named == {"runtime/lifecycle.py"}


def test_rules_see_real_imports() -> None:
    """The checks above would pass on nothing: make sure they see what is there."""
    assert "wsechod.engine" in {i for p in modules("apps") for i in imports(p)}
    assert "websockets.server" in imports(PACKAGE / "engine" / "handshake.py")
