"""What a `pip install` user gets (the wheel's data files, the --print-* flags and what
they warn about, redis as an extra), what the sdist holds (the whole tree, so that its
tests run), and what `make setup` and `make run` do and say."""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import WSECHOD, clean_env, run_cli
from wsechod.process import samples

ROOT = Path(__file__).parents[1]
UNITS = (
    "wsechod.service",
    "wsechod.socket",
    "wsechod@.service",
    "wsechod-activated.service",
    "wsechod-activated.socket",
)
# Where each shipped file comes from in the source tree.
SAMPLE = ROOT / "etc" / "wsechod.toml"  # made from the schema, not shipped as a file
SHIPPED = {
    "wsechod.logrotate": ROOT / "etc" / "logrotate.d" / "wsechod",
    **{unit: ROOT / "systemd" / unit for unit in UNITS},
}
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "*_cache", "__pycache__", "build", "dist", "*.egg-info"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of this tree, offline, with the venv's setuptools."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, work / "src", symlinks=True, ignore=NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(work / "dist"), str(work / "src")],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    [built] = (work / "dist").glob("wsechod-*.whl")
    return built


@pytest.mark.timeout(150)
def test_wheel_ships_the_sample_files_py_typed_and_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert "wsechod/py.typed" in names
        assert not [n for n in names if n.startswith("tests/")]  # the sdist has them
        for name, source in SHIPPED.items():
            assert whl.read(f"wsechod/data/{name}") == source.read_bytes(), name
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
        [license_file] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert whl.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: MIT" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert "Project-URL: " in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist: redis")]
    assert requires and all('extra == "redis"' in line for line in requires)  # not required


@pytest.mark.timeout(150)
def test_installed_wheel_prints_the_files_it_ships(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
         str(target), str(wheel)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    env = clean_env(PYTHONPATH=str(target))

    def wsechod(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "wsechod", *args],
            env=env, capture_output=True, text=True, timeout=20, check=True, cwd=tmp_path,
        )  # fmt: skip
        return result.stdout

    assert wsechod("--print-config-sample") == SAMPLE.read_text()
    origin = subprocess.run(
        [sys.executable, "-c", "import wsechod; print(wsechod.__file__)"],
        env=env, capture_output=True, text=True, timeout=20, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert origin.stdout.startswith(str(target))  # the wheel's copy, not this tree
    assert wsechod("--print-logrotate-sample") == SHIPPED["wsechod.logrotate"].read_text()
    unit = wsechod("--print-unit", "wsechod.service")
    assert f"ExecStart={sys.executable} -m wsechod --config" in unit


def test_print_flags_show_the_repository_files(tmp_path: Path) -> None:
    config = run_cli("--print-config-sample")
    assert (config.returncode, config.stdout) == (0, SAMPLE.read_text())
    logrotate = run_cli("--print-logrotate-sample")
    assert logrotate.stdout == SHIPPED["wsechod.logrotate"].read_text()
    # Units with ExecStart filled in, exactly as `make install-units` writes them.
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-units", f"DESTDIR={tmp_path}",
         f"WSECHOD={WSECHOD}"],
        check=True, timeout=60,
    )  # fmt: skip
    for unit in UNITS:
        printed = run_cli("--print-unit", unit)
        assert printed.returncode == 0
        assert printed.stdout == (tmp_path / "etc" / "systemd" / "system" / unit).read_text()
    for service in ("wsechod.service", "wsechod@.service", "wsechod-activated.service"):
        # the placeholder was filled in
        assert "ExecStart=@WSECHOD@ " in SHIPPED[service].read_text()
        assert f"ExecStart={WSECHOD} " in run_cli("--print-unit", service).stdout
    bad = run_cli("--print-unit", "nginx.service")
    assert bad.returncode == 2
    assert "invalid choice: 'nginx.service'" in bad.stderr
    assert bad.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of a copy of this tree, built offline with the venv's setuptools (the
    PEP 517 hook every frontend calls), unpacked: its top directory."""
    work = tmp_path_factory.mktemp("sdist")
    shutil.copytree(ROOT, work / "src", symlinks=True, ignore=NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-c", "import setuptools.build_meta as b; b.build_sdist('../dist')"],
        cwd=work / "src", check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    [built] = (work / "dist").glob("wsechod-*.tar.gz")
    with tarfile.open(built) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work / "unpacked", filter="data")
        else:  # Python before 3.11.4: this tarball is our own
            tar.extractall(work / "unpacked")
    [top] = (work / "unpacked").iterdir()
    return top


@pytest.mark.timeout(150)
def test_sdist_is_the_whole_source_tree(sdist: Path) -> None:
    """Tests and every helper they import or file they read, or the sdist's tests fail."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, timeout=20,
        check=False,
    )  # fmt: skip
    if listed.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist, say): nothing to compare with")
    shipped = {str(p.relative_to(sdist)) for p in sdist.rglob("*") if not p.is_dir()}
    missing = sorted(set(listed.stdout.splitlines()) - shipped)
    assert not missing, f"not in the sdist (add them to MANIFEST.in): {missing}"
    assert not [p for p in shipped if "node_modules" in p or "__pycache__" in p]


@pytest.mark.timeout(150)
def test_the_sdists_tests_find_their_helpers(sdist: Path) -> None:
    """Collected in the unpacked sdist: every test module imports what it needs."""
    env = clean_env()
    env.pop("CI", None)  # in CI, a test module without its Node helpers fails on purpose
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=sdist, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "tests/test_packaging.py::test_the_sdists_tests_find_their_helpers" in result.stdout


@pytest.fixture
def outside() -> Iterator[Callable[[str], Path]]:
    """Directories made in the given place (/tmp, /home), removed at the end."""
    made: list[Path] = []

    def _outside(where: str) -> Path:
        if not os.access(where, os.W_OK):
            pytest.skip(f"cannot write in {where}")
        made.append(Path(tempfile.mkdtemp(prefix="wsechod-test-", dir=where)))
        made[-1].chmod(0o755)
        return made[-1]

    yield _outside
    for path in made:
        shutil.rmtree(path)


@pytest.mark.parametrize(
    ("where", "warning"),
    [
        (
            "/tmp",
            "which PrivateTmp=yes in this unit hides from the service: it would fail with "
            "status 203/EXEC; install wsechod outside /tmp and /var/tmp, e.g. with make "
            "install (/opt/wsechod); DynamicUser=yes implies PrivateTmp=yes",
        ),
        (
            "/home",
            "which ProtectHome=yes in this unit hides from the service: it would fail with "
            "status 203/EXEC; install wsechod outside /home, /root and /run/user, e.g. with "
            "make install (/opt/wsechod), or set ProtectHome=read-only in the unit",
        ),
    ],
    ids=["tmp", "home"],
)
def test_print_unit_warns_when_the_sandbox_hides_the_command(
    outside: Callable[[str], Path], where: str, warning: str
) -> None:
    """A venv under /tmp or /home printed a unit that failed with 203/EXEC, and nothing said
    so. The copy of the console script still runs this venv's wsechod."""
    command = outside(where) / "wsechod"
    shutil.copy(WSECHOD, command)
    result = subprocess.run(
        [str(command), "--print-unit", "wsechod.service"],
        env=clean_env(), capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert f"ExecStart={command} --config" in result.stdout  # printed all the same
    assert (
        f"wsechod: warning: wsechod.service: the command {command} is under {where}, {warning}"
        in result.stderr.splitlines()
    )
    socket_unit = subprocess.run(
        [str(command), "--print-unit", "wsechod.socket"],
        env=clean_env(), capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert (socket_unit.returncode, socket_unit.stderr) == (0, "")  # nothing it runs


UNIT = samples.text("wsechod.service")


@pytest.mark.unit
def test_unit_problems_follow_links_and_name_the_interpreter(
    outside: Callable[[str], Path],
) -> None:
    linked = outside("/run") / "wsechod"
    linked.symlink_to("/tmp/somewhere/.venv/bin/wsechod")
    problems = samples.unit_problems(
        UNIT,
        [("the command", linked), ("the interpreter", Path("/root/.pyenv/bin/python3.12"))],
    )
    assert [p.split(", which ")[0] for p in problems] == [
        "the interpreter /root/.pyenv/bin/python3.12 is under /root",
        "the command /tmp/somewhere/.venv/bin/wsechod is under /tmp",  # where the link leads
    ]
    python = Path("/home/nobody-here/py/bin/python")  # a way open to others, as far as it goes
    [home] = samples.unit_problems(UNIT, [("the interpreter", python)])
    assert home == (
        f"the interpreter {python} is under /home, which ProtectHome=yes in this "
        "unit hides from the service: it would fail with status 203/EXEC; use a Python "
        "installed outside /home, /root and /run/user, e.g. with make install "
        "PYTHON=/usr/bin/python3 (/opt/wsechod), or set ProtectHome=read-only in the unit"
    )


@pytest.mark.unit
def test_unit_problems_name_a_directory_the_dynamic_user_cannot_enter(
    outside: Callable[[str], Path],
) -> None:
    private = outside("/run")
    private.chmod(0o700)
    (private / "lib").mkdir()
    assert samples.unit_problems(UNIT, [("the package", private / "lib")]) == [
        f"the package {private / 'lib'} is out of reach of the transient user of "
        f"DynamicUser=yes ({private} has mode 700): it would fail to import wsechod; make "
        "the way readable by others (chmod o+rx), or install wsechod elsewhere"
    ]
    private.chmod(0o711)
    assert samples.unit_problems(UNIT, [("the package", private / "lib")]) == []


@pytest.mark.unit
def test_unit_problems_respect_what_the_unit_says() -> None:
    relaxed = (
        UNIT.replace("DynamicUser=yes", "DynamicUser=no")
        .replace("ProtectHome=yes", "ProtectHome=read-only")
        .replace("PrivateTmp=yes", "PrivateTmp=no")
    )
    paths = [("the command", Path("/home/me/.venv/bin/wsechod")), ("the package", Path("/tmp/w"))]
    assert samples.unit_problems(relaxed, paths) == []
    assert len(samples.unit_problems(UNIT, paths)) == 2
    assert samples.unit_problems(samples.text("wsechod.socket"), paths) == []


@pytest.fixture
def without_redis(tmp_path: Path) -> dict[str, str]:
    """An environment where `import redis` fails, as without the [redis] extra."""
    (tmp_path / "sitecustomize.py").write_text("import sys\n\nsys.modules['redis'] = None\n")
    env = clean_env(PYTHONPATH=str(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "import redis"], env=env, timeout=20, check=False)
    assert probe.returncode == 1  # the stand-in works
    return env


def test_redis_broker_without_redis_names_the_extra(without_redis: dict[str, str]) -> None:
    argv = ["--config", "", "--mode", "relay", "--broker", "redis://127.0.0.1:6379/0"]
    for args in (["--check-config", *argv], argv):
        result = run_cli(*args, env=without_redis)
        assert result.returncode == 2
        assert result.stderr == (
            "wsechod: error: invalid broker 'redis://127.0.0.1:6379/0' (from --broker): "
            "the Redis broker needs the redis package: pip install 'wsechod[redis]'\n"
        )


@pytest.mark.parametrize("mode", ["echo", "relay"])
def test_serves_without_redis_when_it_is_not_used(
    start: Any, without_redis: dict[str, str], mode: str
) -> None:
    daemon = start("--mode", mode, "--relay-echo", env=without_redis)
    with connect(f"{daemon.url}/room") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"


FAKE_OLD_PYTHON = '#!/bin/sh\necho "Python 3.9.18"\n'
# Enough of a Python 3.12 for `make setup`: its identity, venv creation, pip (logged).
FAKE_NEW_PYTHON = """#!/bin/sh
case "$1" in
  --version) echo "Python 3.12.1" ;;
  -c) echo "3.12.1 /opt/python-3.12" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
      else echo "$*" >> "$(dirname "$0")/../../pip.log"; fi ;;
esac
"""


def make_copy(tmp_path: Path) -> Path:
    """Just what `make setup` reads, in a directory of its own."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    return work


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def make(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(work), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_make_setup_refuses_an_old_python_in_one_line(tmp_path: Path) -> None:
    work = make_copy(tmp_path)
    old = script(tmp_path / "bin" / "python3.9", FAKE_OLD_PYTHON)
    result = make(work, "setup", f"PYTHON={old}")
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert f"wsechod needs Python 3.11 or newer and {old} is Python 3.9.18" in line
    assert "make setup PYTHON=python3.12" in line
    assert not (work / ".venv").exists()


def test_make_setup_rebuilds_a_venv_another_python_made(tmp_path: Path) -> None:
    work = make_copy(tmp_path)
    new = script(tmp_path / "bin" / "python3.12", FAKE_NEW_PYTHON)
    # A venv made by Python 3.9, set up as far as the stamp (which is newer than pyproject).
    script(work / ".venv" / "bin" / "python", '#!/bin/sh\necho "3.9.18 /usr"\n')
    (work / ".venv" / "lib" / "python3.9").mkdir(parents=True)
    (work / ".venv" / ".installed").touch()
    result = make(work, "setup", f"PYTHON={new}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f".venv was made by Python 3.9.18 /usr, not by {new} (3.12.1 /opt/python-3.12): "
        "rebuilding it\n"
    )
    assert not (work / ".venv" / "lib" / "python3.9").exists()
    assert (work / ".venv" / "bin" / "python").read_text() == FAKE_NEW_PYTHON
    assert (work / ".venv" / ".installed").exists()
    pip_log = work / "pip.log"
    assert "-e .[dev,redis]" in pip_log.read_text()
    # Made by this interpreter now: kept as it is.
    pip_log.unlink()
    again = make(work, "setup", f"PYTHON={new}")
    assert (again.returncode, again.stderr) == (0, "")
    assert not pip_log.exists()


def test_make_run_says_only_what_it_runs(tmp_path: Path) -> None:
    """Not make's own "'.venv/.installed' is up to date", once the venv is there."""
    work = make_copy(tmp_path)
    new = script(tmp_path / "bin" / "python3.12", FAKE_NEW_PYTHON)
    assert make(work, "setup", f"PYTHON={new}").returncode == 0
    script(work / ".venv" / "bin" / "wsechod", '#!/bin/sh\necho "serving with $*"\n')
    result = make(work, "run", f"PYTHON={new}", "PORT=9999")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        ".venv/bin/wsechod --port 9999 ",
        "serving with --port 9999",
    ]
