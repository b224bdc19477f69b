"""Settings: sources, precedence and the errors an operator sees (exit status 2)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import clean_env, run_cli
from wsechod import __version__
from wsechod.settings import KEYS


def check_config(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run --check-config and return {key: value as printed}."""
    result = run_cli("--check-config", *args, env=env)
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        key, _, rest = line.partition(" = ")
        values[key] = rest.split("  # ")[0]
    return values


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "-1"], {}, "invalid port '-1' (from --port): must be between 0 and 65535"),
        (["--port", "65536"], {}, "invalid port '65536'"),
        (["--port", "eighty"], {}, "invalid port 'eighty' (from --port): expected an integer"),
        ([], {"WSECHOD_PORT": "-5"}, "invalid port '-5' (from WSECHOD_PORT)"),
        (["--log-level", "loud"], {}, "invalid log_level 'loud'"),
        (["--log-format", "xml"], {}, "invalid log_format 'xml'"),
        (
            ["--max-size", "0"],
            {},
            "invalid max_size '0' (from --max-size): must be between 1 and 1073741824",
        ),
        (["--drain-timeout", "-1"], {}, "invalid drain_timeout '-1'"),
        (["--drain-timeout", "nan"], {}, "invalid drain_timeout 'nan'"),
        ([], {"WSECHOD_PROT": "1"}, "unknown key 'prot' from environment variable WSECHOD_PROT"),
        (["--port", "8_0"], {}, "invalid port '8_0' (from --port): expected an integer"),
        (["--write-limit", "2147483648"], {}, "must be between 1 and 1073741824"),
        ([], {"WSECHOD_DAEMON": "maybe"}, "invalid daemon 'maybe' (from WSECHOD_DAEMON)"),
        (["--bogus", "1"], {}, "unrecognized arguments: --bogus 1"),
        (["--user", "no-such-user-here"], {}, "invalid user 'no-such-user-here': no such user"),
    ],
)
def test_bad_value_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = run_cli("--config", "", *args, env=clean_env(**env))
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("prot = 80\n", "unknown key 'prot' in {path} (did you mean 'port'?)"),
        ("port = 'x'\n", "invalid port 'x' (from {path}): expected an integer"),
        ("port = -1\n", "invalid port -1 (from {path}): must be between 0 and 65535"),
        ("port = true\n", "invalid port True (from {path}): expected int, got bool"),
        ('log_level = "loud"\n', "invalid log_level 'loud' (from {path})"),
        ("port = = 1\n", "invalid TOML in {path}: "),
        ("port = 1\n\udcff\n", "invalid TOML in {path}: not UTF-8 at byte 9"),
        ("daemon = 'yes please'\n", "invalid daemon 'yes please' (from {path})"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_2(
    content: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_bytes(content.encode(errors="surrogateescape"))
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert expected.format(path=path) in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr
    assert "absent.toml" in result.stderr


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text("port = 1111\nmax_size = 2222\ndrain_timeout = 3\nlog_level = 'warning'\n")
    env = clean_env(WSECHOD_PORT="4444", WSECHOD_MAX_SIZE="5555", WSECHOD_CONFIG=str(path))
    values = check_config("--port", "6666", env=env)
    assert values["port"] == "6666"  # flag beats env and file
    assert values["max_size"] == "5555"  # env beats file
    assert values["drain_timeout"] == "3.0"  # file beats default
    assert values["log_level"] == '"warning"'
    assert values["host"] == '"127.0.0.1"'  # default


def test_check_config_names_each_source(tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text("max_queue = 8\n")
    result = run_cli("--check-config", "--config", str(path), "--port", "9")
    assert result.returncode == 0
    assert f"# config file: {path}" in result.stdout
    assert "port = 9  # --port" in result.stdout
    assert f"max_queue = 8  # {path}" in result.stdout
    assert 'host = "127.0.0.1"  # default' in result.stdout


def test_sample_config_is_valid_and_shows_every_default() -> None:
    sample = Path(__file__).parents[1] / "etc" / "wsechod.toml"
    result = run_cli("--check-config", "--config", str(sample))
    assert result.returncode == 0, result.stderr
    # Uncommented, the sample's "# key = value" lines must be exactly the defaults.
    lines = [ln[2:] for ln in sample.read_text().splitlines() if re.match(r"# \w+ = ", ln)]
    shown = tomllib.loads("\n".join(lines))
    assert shown == {f.name: f.default for f in KEYS}


def test_booleans_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    path.write_text("daemon = true\n")
    assert check_config("--config", str(path))["daemon"] == "true"
    env = clean_env(WSECHOD_DAEMON="0", WSECHOD_CONFIG=str(path))
    assert check_config(env=env)["daemon"] == "false"  # env beats file; "0" is false
    assert check_config("--no-daemon", "--config", str(path))["daemon"] == "false"


def test_version_and_module_entry_point() -> None:
    assert run_cli("--version").stdout.strip() == f"wsechod {__version__}"
    result = subprocess.run(
        [sys.executable, "-m", "wsechod", "--version"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.stdout.strip() == f"wsechod {__version__}"


def test_help_lists_every_key_with_its_env_var() -> None:
    out = run_cli("--help").stdout
    for flag, var in [
        ("--max-size", "WSECHOD_MAX_SIZE"),
        ("--drain-timeout", "WSECHOD_DRAIN_TIMEOUT"),
    ]:
        assert flag in out
        assert var in out


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for f in KEYS:
        default = f"{f.default:g}" if isinstance(f.default, float) else f.default
        assert f"| `{f.name}` | `{default}` |" in readme, f.name
