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


# The engine's modules, lowest first: each imports only those before it (a connection is
# typed against the protocol of the engine it asks things of, not the engine itself).
ENGINE_ORDER = (
    "addresses",
    "frames",
    "interface",
    "request",
    "bodies",
    "proxy",
    "options",
    "deflate",
    "throttle",
    "readbuffer",
    "upgrade",
    "budget",
    "connection",
    "handshake",
    "server",
    "__init__",
)


def test_the_engine_imports_in_one_direction() -> None:
    files = {p.stem for p in modules("engine")}
    assert files == set(ENGINE_ORDER), files ^ set(ENGINE_ORDER)
    back = {}
    for rank, name in enumerate(ENGINE_ORDER):
        path = PACKAGE / "engine" / f"{name}.py"
        later = tuple(f"wsechod.engine.{n}" for n in ENGINE_ORDER[rank:] if n != "__init__")
        found = imports(path)
        bad = sorted(i for i in found if i.startswith(later))
        # "from wsechod.engine import frames" names the module as an attribute
        bad += sorted(
            i
            for i in found
            if i.startswith("wsechod.engine.")
            and i.count(".") == 2
            and i.rsplit(".", 1)[1] in ENGINE_ORDER[rank:]
            and i not in bad
        )
        if name == "__init__":
            bad = []
        if bad:
            back[name] = bad
    assert back == {}


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


LEAVES = ("wsechod.log", "wsechod.ratelimit", "wsechod._version")


def test_metrics_knows_no_application() -> None:
    """Applications export their own figures (``Application.families``/``figures``);
    /metrics renders whatever they describe."""
    assert (
        offending([PACKAGE / "runtime" / "metrics.py"], ("wsechod.apps", "wsechod.brokers")) == {}
    )


def test_the_runtime_knows_the_workers_only_through_a_protocol() -> None:
    """What a worker publishes is handed to the lifecycle by the supervisor's side."""
    assert offending(modules("runtime"), ("wsechod.process",)) == {}


@pytest.mark.parametrize(
    ("room", "allowed"),
    [
        (
            "apps",
            (
                "wsechod.apps",
                "wsechod.engine",
                "wsechod.channels",
                "wsechod.history",
                "wsechod.brokers.base",
                "wsechod.log",
                "wsechod.ratelimit",
            ),
        ),
        ("auth", ("wsechod.auth", "wsechod.channels")),
        (
            "brokers",
            (
                "wsechod.brokers",
                "wsechod.history",
                "wsechod.log",
                "wsechod.ratelimit",
                "wsechod.settings.values",
            ),
        ),
        (
            "http",
            (
                "wsechod.http",
                "wsechod.engine",
                "wsechod.auth",
                "wsechod.channels",
                "wsechod.history",
                "wsechod.settings",
                "wsechod.log",
                "wsechod.ratelimit",
            ),
        ),
    ],
)
def test_each_room_imports_only_what_is_below_it(room: str, allowed: tuple[str, ...]) -> None:
    """Data flows one way: settings -> listeners -> lifecycle -> engine -> applications
    -> brokers; applications see the engine's interface, brokers see nothing above them."""
    found = {
        str(path.relative_to(PACKAGE)): sorted(
            i
            for i in imports(path)
            if i.startswith("wsechod") and i != "wsechod" and not i.startswith(allowed)
        )
        for path in modules(room)
    }
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize(
    "leaf",
    [
        "_version.py",
        "log.py",
        "ratelimit.py",
        "http/origins.py",
        "channels.py",
        "history.py",
        "auth/keys.py",
        "settings/values.py",
        "runtime/tls.py",
    ],
)
def test_leaves_import_no_other_room(leaf: str) -> None:
    """What many rooms use imports nothing of them (a logger aside): no arrow back up."""
    found = {i for i in imports(PACKAGE / leaf) if i.startswith("wsechod")}
    assert found <= {"wsechod.log", "wsechod.log.get_logger"}


# Modules over LONG lines, and why each is still one concern read top to bottom.
LONG = 400
ONE_CONCERN = {
    "engine/connection.py": "one connection's protocol: parsing, flow, closing, keepalive",
    "engine/server.py": "the engine: listening, the tables of connections and handshakes",
    "engine/handshake.py": "one opening handshake, from accept to the 101",
    "settings/schema.py": "the declaration of every key",
    "process/workers/supervisor.py": "the main process's loop over its workers",
    "brokers/redis.py": "one broker's sessions with Redis: its shards, their connections",
    "apps/relay.py": "the relay: channels, fan-out, slow consumers",
}


def test_modules_stay_short_or_say_why() -> None:
    long = {
        str(path.relative_to(PACKAGE))
        for path in modules()
        if len(path.read_text().splitlines()) > LONG
    }
    assert long <= set(ONE_CONCERN), sorted(long - set(ONE_CONCERN))


def test_rules_see_real_imports() -> None:
    """The checks above would pass on nothing: make sure they see what is there."""
    assert "wsechod.engine" in {i for p in modules("apps") for i in imports(p)}
    assert "websockets.headers" in imports(PACKAGE / "engine" / "upgrade.py")
