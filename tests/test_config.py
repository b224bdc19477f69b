"""Settings: sources, precedence and the errors an operator sees (exit status 2)."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import clean_env, run_cli
from wsechod._version import __version__
from wsechod.runtime import memory
from wsechod.settings import KEYS, default_text, describe, env_name, flag_name, note


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
        ("port = 'x'\n", "invalid port 'x' (from {path}): expected int, got str"),
        ("port = -1\n", "invalid port -1 (from {path}): must be between 0 and 65535"),
        ("port = true\n", "invalid port True (from {path}): expected int, got bool"),
        ('log_level = "loud"\n', "invalid log_level 'loud' (from {path})"),
        ("port = = 1\n", "invalid TOML in {path}: "),
        ("port = 1\n\udcff\n", "invalid TOML in {path}: not UTF-8 at byte 9"),
        ("daemon = 'yes please'\n", "invalid daemon 'yes please' (from {path})"),
        # TOML values have types: a quoted number or boolean is a string, not a setting.
        (
            'port = "8080"\n',
            "invalid port '8080' (from {path}): expected int, got str "
            "(TOML: write 8080 without quotes)",
        ),
        (
            'daemon = "yes"\n',
            "invalid daemon 'yes' (from {path}): expected bool, got str "
            "(TOML: write true without quotes)",
        ),
        ('drain_timeout = "2.5"\n', "invalid drain_timeout '2.5' (from {path}): expected float"),
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
    path.write_text("max_size = 8\n")
    result = run_cli("--check-config", "--config", str(path), "--port", "9")
    assert result.returncode == 0
    assert f"# config file: {path}" in result.stdout
    assert "port = 9  # --port" in result.stdout
    assert f"max_size = 8  # {path}" in result.stdout
    assert 'host = "127.0.0.1"  # default' in result.stdout


def listed(value: Any) -> Any:
    """A list setting's value (a tuple) as TOML writes it."""
    return list(value) if isinstance(value, tuple) else value


def test_the_sample_config_is_made_from_the_schema() -> None:
    """etc/wsechod.toml (what make install-systemd copies) is --print-config-sample's."""
    sample = Path(__file__).parents[1] / "etc" / "wsechod.toml"
    printed = run_cli("--print-config-sample").stdout
    assert sample.read_text() == printed, "regenerate: wsechod --print-config-sample"
    assert all(note(key) for key in ("host", "backlog", "memory_limit", "workers"))


def test_sample_config_is_valid_and_shows_every_default(tmp_path: Path) -> None:
    sample = Path(__file__).parents[1] / "etc" / "wsechod.toml"
    result = run_cli("--check-config", "--config", str(sample))
    assert result.returncode == 0, result.stderr
    # Uncommented, the sample's "# key = value" lines must be exactly the defaults; the
    # tables come last, as an example (their default is none).
    keys, _, tables = sample.read_text().partition("\n# [[")
    lines = [ln[2:] for ln in keys.splitlines() if re.match(r"# \w+ = ", ln)]
    shown = tomllib.loads("\n".join(lines))
    # Lists are tuples in Settings (frozen), arrays in TOML; a default computed on each
    # machine is shown as the word for it (backlog = "max").
    assert shown == {f.name: listed(default_text(f.name)) for f in KEYS if not f.metadata["table"]}
    example = "[[" + "\n".join(ln.removeprefix("# ") for ln in tables.splitlines())
    assert set(tomllib.loads(example)) == {f.name for f in KEYS if f.metadata["table"]}
    uncommented = tmp_path / "tables.toml"
    uncommented.write_text(example)
    result = run_cli("--check-config", "--config", str(uncommented))
    assert result.returncode == 0, result.stderr


def test_booleans_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "wsechod.toml"
    # A log file: this machine may have no syslog socket for a daemon to log to.
    path.write_text(f"daemon = true\nlog_file = '{tmp_path / 'w.log'}'\n")
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


def test_help_lists_every_key_with_its_flag_env_var_and_description() -> None:
    """--help is made from the schema, as the sample config and the docs' reference are."""
    shown = run_cli("--help").stdout
    out = "".join(shown.split())  # argparse wraps lines anywhere
    for f in KEYS:
        if f.metadata["table"]:  # the config file's only
            assert f"[[{f.name}]]:{''.join(describe(f.name).split())}" in out
            assert flag_name(f.name) not in shown and env_name(f.name) not in shown
            continue
        for text in (flag_name(f.name), env_name(f.name), describe(f.name)):
            if f.metadata["secret"] and text == flag_name(f.name):
                assert f"{text} {f.name.upper()}" not in shown  # no flag: command lines are public
                continue
            assert "".join(text.split()) in out, (f.name, text)


@pytest.mark.parametrize(
    ("broker", "reason"),
    [
        ("redis:127.0.0.1", "expected memory, redis://[user:password@]host[:port][/db]"),
        ("redis://127.0.0.1:abc/0", "port 'abc' must be a number between 1 and 65535"),
        ("redis://127.0.0.1:99999/0", "port '99999' must be a number between 1 and 65535"),
        ("redis:///", "no host"),
        ("redis://host/notadb", "database 'notadb' must be a number"),
        ("unix:///run/redis.sock?db=one", "database 'one' must be a number"),
        ("unix://host/run/redis.sock", "expected unix:///path/to/socket"),
        ("http://127.0.0.1:6379/0", "expected memory, redis://"),
    ],
)
def test_bad_broker_url_is_one_line_and_exit_2(broker: str, reason: str) -> None:
    result = run_cli("--config", "", "--mode", "relay", "--broker", broker)
    assert result.returncode == 2
    prefix = f"wsechod: error: invalid broker {broker!r} (from --broker): "
    assert result.stderr.startswith(prefix)
    assert reason in result.stderr
    assert result.stderr.count("\n") == 1


def test_broker_urls_accepted_and_shown_without_their_password(tmp_path: Path) -> None:
    forms = {
        "memory": "memory",
        "redis://127.0.0.1": "redis://127.0.0.1",
        "redis://redis.example:6379/0": "redis://redis.example:6379/0",
        "redis://[::1]:6379/15": "redis://[::1]:6379/15",
        "redis://wsechod:s3cret@10.1.2.3:6379/2": "redis://wsechod:***@10.1.2.3:6379/2",
        "rediss://:s3cret@redis.example:6380": "rediss://:***@redis.example:6380",
        "unix:///run/redis/redis.sock?db=3": "unix:///run/redis/redis.sock?db=3",
        "unix://wsechod:s3cret@/run/redis.sock": "unix://wsechod:***@/run/redis.sock",
    }
    for given, shown in forms.items():
        result = run_cli("--check-config", "--config", "", "--mode", "relay", "--broker", given)
        assert result.returncode == 0, (given, result.stderr)
        assert f"broker = {json.dumps(shown)}  # --broker" in result.stdout
        assert "s3cret" not in result.stdout + result.stderr
    # From the file and the environment too, and in the error about an invalid one.
    path = tmp_path / "wsechod.toml"
    path.write_text('mode = "relay"\nbroker = "redis://:s3cret@127.0.0.1:6379/1"\n')
    assert check_config("--config", str(path))["broker"] == '"redis://:***@127.0.0.1:6379/1"'
    env = clean_env(WSECHOD_MODE="relay", WSECHOD_BROKER="redis://u:s3cret@127.0.0.1/0")
    assert check_config("--config", "", env=env)["broker"] == '"redis://u:***@127.0.0.1/0"'
    bad = run_cli("--config", "", "--mode", "relay", "--broker", "redis://u:s3cret@h:port/0")
    assert bad.returncode == 2
    assert "invalid broker 'redis://u:***@h:port/0' (from --broker)" in bad.stderr
    assert "s3cret" not in bad.stderr


@pytest.mark.parametrize(
    ("args", "unused"),
    [
        (["--broker", "redis://127.0.0.1:6379/0"], "broker"),
        (["--relay-echo"], "relay_echo"),
        (["--relay-echo", "--broker", "redis://127.0.0.1:6379/0"], "relay_echo, broker"),
    ],
)
def test_relay_settings_in_echo_mode_get_one_warning(args: list[str], unused: str) -> None:
    result = run_cli("--check-config", "--config", "", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"wsechod: warning: relay settings have no effect in echo mode: {unused}\n"
    )
    relay = run_cli("--check-config", "--config", "", "--mode", "relay", *args)
    assert (relay.returncode, relay.stderr) == (0, "")


def test_relay_settings_in_echo_mode_warned_at_start(start: Any) -> None:
    daemon = start("--relay-echo", "--broker", "redis://127.0.0.1:6379/0")
    warning = daemon.wait_for("settings have no effect in echo mode")
    assert (warning["level"], warning["keys"]) == ("warning", ["relay_echo", "broker"])


@pytest.mark.parametrize(
    ("given", "level"),
    [("warn", "warning"), ("WARN", "warning"), ("critical", "error"), ("CRITICAL", "error"),
     ("fatal", "error"), ("err", "error"), ("Crit", "error")],
)  # fmt: skip
def test_usual_spellings_of_log_levels(given: str, level: str, tmp_path: Path) -> None:
    assert check_config("--config", "", "--log-level", given)["log_level"] == f'"{level}"'
    env = clean_env(WSECHOD_LOG_LEVEL=given)
    assert check_config("--config", "", env=env)["log_level"] == f'"{level}"'
    path = tmp_path / "wsechod.toml"
    path.write_text(f'log_level = "{given}"\n')
    assert check_config("--config", str(path))["log_level"] == f'"{level}"'


def test_help_lists_the_values_of_choice_settings() -> None:
    out = " ".join(run_cli("--help", env=clean_env(COLUMNS="80")).stdout.split())
    for flag, values in [
        ("--log-level", "debug, info, warning, error"),
        ("--log-format", "auto, console, json"),
        ("--compression", "none, deflate"),
        ("--mode", "echo, relay"),
        ("--slow-consumer", "drop, close"),
    ]:
        assert re.search(rf"{flag} \S+ (?:(?! --).)*one of: {values}", out), (flag, values)
    assert "warn for warning" in out


KUBERNETES = {
    # A Service named wsechod...
    "WSECHOD_SERVICE_HOST": "10.0.0.7",
    "WSECHOD_SERVICE_PORT": "8765",
    "WSECHOD_SERVICE_PORT_WS": "8765",
    "WSECHOD_PORT": "tcp://10.0.0.7:8765",
    "WSECHOD_PORT_8765_TCP": "tcp://10.0.0.7:8765",
    "WSECHOD_PORT_8765_TCP_PROTO": "tcp",
    "WSECHOD_PORT_8765_TCP_PORT": "8765",
    "WSECHOD_PORT_8765_TCP_ADDR": "10.0.0.7",
    # ...and one named wsechod-redis.
    "WSECHOD_REDIS_SERVICE_HOST": "10.0.0.8",
    "WSECHOD_REDIS_SERVICE_PORT": "6379",
    "WSECHOD_REDIS_PORT": "udp://10.0.0.8:6379",
    "WSECHOD_REDIS_PORT_6379_UDP_ADDR": "10.0.0.8",
}


def test_kubernetes_service_variables_are_ignored_with_one_warning(start: Any) -> None:
    result = run_cli("--check-config", "--config", "", env=clean_env(**KUBERNETES))
    assert result.returncode == 0, result.stderr
    assert "port = 8765  # default" in result.stdout  # tcp://10.0.0.7:8765 is not a port
    [line] = result.stderr.splitlines()
    assert line.startswith("wsechod: warning: ignored environment variables that Kubernetes")
    assert line.endswith(": " + ", ".join(sorted(KUBERNETES)))
    # A pod starts, and says what it ignored.
    daemon = start(env=clean_env(**KUBERNETES))
    warning = daemon.wait_for("kubernetes service variables ignored")
    assert warning["variables"] == sorted(KUBERNETES)
    # Our own variables still count, and a typo of one still stops the start.
    env = clean_env(**{**KUBERNETES, "WSECHOD_PORT": "9999"})
    assert check_config("--config", "", env=env)["port"] == "9999"
    typo = run_cli("--config", "", env=clean_env(**KUBERNETES, WSECHOD_PROT="1"))
    assert typo.returncode == 2
    assert "unknown key 'prot' from environment variable WSECHOD_PROT" in typo.stderr
    assert typo.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["file", "env", "flag"])
def test_retired_key_still_starts_with_a_notice(where: str, tmp_path: Path) -> None:
    """max_queue meant something to the old data path; a file, unit or script that sets it
    must still start, and hear that it does nothing."""
    path = tmp_path / "wsechod.toml"
    path.write_text("max_queue = 8\n" if where == "file" else "")
    env = clean_env(WSECHOD_MAX_QUEUE="8") if where == "env" else clean_env()
    flags = ["--max-queue", "8"] if where == "flag" else []
    result = run_cli("--check-config", "--config", str(path), *flags, env=env)
    assert result.returncode == 0, result.stderr
    assert "max_queue" not in result.stdout  # not a setting any more
    assert result.stderr.count("\n") == 1
    assert "max_queue" in result.stderr and "has no effect any more" in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cgroup", "files", "expected_gib"),
    [
        ("0::/\n", {}, 16.0),  # no limit: the machine's
        ("0::/ws\n", {"sys/fs/cgroup/ws/memory.max": "max\n"}, 16.0),
        ("0::/ws\n", {"sys/fs/cgroup/ws/memory.max": str(4 * 2**30)}, 4.0),  # cgroup v2
        (  # a limit on a parent (a slice) holds for the groups below it
            "0::/app.slice/ws.service\n",
            {
                "sys/fs/cgroup/app.slice/memory.max": str(3 * 2**30),
                "sys/fs/cgroup/app.slice/ws.service/memory.max": "max\n",
            },
            3.0,
        ),
        (
            "4:memory:/docker/abc\n",
            {"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(2 * 2**30)},
            2.0,
        ),
        (  # v1, the container sees its group as the root; unlimited is a huge number
            "4:memory:/docker/abc\n",
            {"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"},
            16.0,
        ),
    ],
)
def test_memory_limit_auto_is_a_quarter_of_what_the_process_may_use(
    tmp_path: Path, cgroup: str, files: dict[str, str], expected_gib: float
) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: {16 * 2**20} kB\nMemFree: 1 kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert memory.available(tmp_path) == expected_gib * 2**30
    assert memory.auto_limit(1, tmp_path) == expected_gib * 2**30 // 4
    assert memory.auto_limit(4, tmp_path) == expected_gib * 2**30 // 16


def test_memory_limit_takes_auto_and_bytes() -> None:
    assert run_cli("--config", "", "--check-config", "--memory-limit", "auto").returncode == 0
    result = run_cli("--config", "", "--check-config", "--memory-limit", "1.5")
    assert result.returncode == 2
    assert "invalid memory_limit '1.5' (from --memory-limit)" in result.stderr
