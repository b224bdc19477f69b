"""What a new user pastes from the README and the docs works as pasted: the commands are run
here as they are written (the port and the paths of this checkout put in), against a real
server. The README's "Try it" and the docs' "Getting started" give the same client; the TLS
example is in the docs' "Security and limits"."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, clean_env

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent  # the README's .venv/bin/ (this checkout's, usually)
# Where a new user first runs a server and a client: (document, level-2 section).
TRY_IT = [("README.md", "Try it"), ("docs/getting-started.md", "Run")]


def section(title: str, document: str = "README.md") -> str:
    """A level-2 section of a document (the README, a page of docs/), up to the next one."""
    text = (ROOT / document).read_text() + "\n## "
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert found is not None, f"no section {title!r} in {document}"
    return found.group(1)


def commands(text: str) -> list[str]:
    """The commands of the ```sh blocks in ``text``, continuation lines joined."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [c for block in blocks for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def client(text: str) -> str:
    """The one-line client in ``text`` (the command with ``ws.recv``)."""
    [line] = [c for c in commands(text) if "ws.recv" in c]
    return line


def run_shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=clean_env(**env), capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip


def as_here(command: str, port: int) -> str:
    """The README's command for this checkout: its venv, and the port of the test's server."""
    command = command.replace(".venv/bin/", f"{VENV_BIN}/").replace(":8765", f":{port}")
    return re.sub(r"(^|= *|\s)python ", rf"\1{VENV_BIN}/python ", command)


class MakeRun:
    """``make run`` as the README says, in a session of its own (make and wsechod)."""

    def __init__(self) -> None:
        # PYTHON: the interpreter of this venv, so that make setup keeps it as it is.
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(ROOT), "run", f"PYTHON={sys.executable}",
             "PORT=0", "ARGS=--config '' --log-format json"],
            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.listening: dict[str, Any] = {}
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if '"listening"' in line:
                self.listening = json.loads(line)
                self.done.set()
        self.done.set()

    def port(self) -> int:
        assert self.done.wait(60) and self.listening, "make run never listened"
        return int(self.listening["addresses"][0].rsplit(":", 1)[1])

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.communicate(timeout=20)


@pytest.fixture
def make_run() -> Iterator[MakeRun]:
    running = MakeRun()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.timeout(90)
def test_the_run_sections_client_prints_the_echo_of_make_run(make_run: MakeRun) -> None:
    """The README said `python -m websockets ...`, which is not on the PATH after make
    setup, and which sends what it reads and leaves at the end of its input, echo or not."""
    port = make_run.port()
    for document, title in TRY_IT:
        line = client(section(title, document))
        assert line.startswith(".venv/bin/python -c "), document
        result = run_shell(as_here(line, port), ROOT)
        assert (result.stdout, result.stderr) == ("hello\n", ""), document  # no warning either


@pytest.mark.unit
@pytest.mark.parametrize(("document", "title"), TRY_IT)
def test_the_run_sections_commands_are_those_of_the_venv(document: str, title: str) -> None:
    for command in commands(section(title, document)):
        program = command.split()[0]
        assert program in ("make", ".venv/bin/wsechod", ".venv/bin/python", "curl"), command
        if program.startswith(".venv/"):
            assert (VENV_BIN / Path(program).name).exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_the_tls_sections_self_signed_example_trusts_its_certificate(tmp_path: Path) -> None:
    """wss:// with a certificate of one's own: SSL_CERT_FILE= makes the client trust it."""
    tls = section("TLS", "docs/security.md")
    [make_cert] = [c for c in commands(tls) if c.startswith("openssl req -x509")]
    [serve] = [c for c in commands(tls) if "--tls-cert cert.pem" in c]
    created = run_shell(make_cert, tmp_path)
    assert created.returncode == 0, created.stderr
    argv = serve.replace("--port 8765", "--port 0").split()[1:]
    daemon = Daemon(*argv, prefix=("env", f"--chdir={tmp_path}")).ready()
    try:
        line = client(tls)
        assert line.startswith("SSL_CERT_FILE=cert.pem ")
        result = run_shell(as_here(line, daemon.port), tmp_path)
        assert (result.stdout, result.stderr) == ("hello\n", "")
        untrusted = run_shell(as_here(line.partition(" ")[2], daemon.port), tmp_path)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr  # what SSL_CERT_FILE= is for
    finally:
        daemon.kill()


@pytest.mark.unit
def test_the_first_screen_says_what_make_test_costs_and_installs() -> None:
    """4-6 minutes, and packages installed as root with apt-get: before `## Install`."""
    first_screen = README.partition("\n## ")[0]
    assert re.search(r"make test .*\(\d+-\d+ minutes\)", first_screen)
    makefile = (ROOT / "Makefile").read_text()
    installed = {
        package
        for found in re.findall(r"apt-get install -y ([^;}\n]+)", makefile)
        for package in found.split()
    }
    assert installed >= {"redis-server", "systemd", "nodejs", "npm"}
    assert "apt-get" in first_screen and "root" in first_screen
    assert [p for p in sorted(installed) if f"`{p}`" not in first_screen] == []
