"""What a `pip install` user gets (the wheel's data files, the --print-* flags, redis as
an extra) and what `make setup` does with the wrong interpreter."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import WSECHOD, clean_env, run_cli

ROOT = Path(__file__).parents[1]
UNITS = (
    "wsechod.service",
    "wsechod.socket",
    "wsechod@.service",
    "wsechod-activated.service",
    "wsechod-activated.socket",
)
# Where each shipped file comes from in the source tree.
SHIPPED = {
    "wsechod.toml": ROOT / "etc" / "wsechod.toml",
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

    assert wsechod("--print-config-sample") == SHIPPED["wsechod.toml"].read_text()
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
    assert (config.returncode, config.stdout) == (0, SHIPPED["wsechod.toml"].read_text())
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
