"""The compose file and the Kubernetes manifests that ship beside the image: each valid for
its tool (the Compose specification's schema, Kubernetes' own schemas from 1.28 on,
strictly: an unknown field fails), and the wsechod settings in them, over the image's own
variables, valid for wsechod and without a warning (``--check-config``). Each check is
shown to fail on a broken copy."""

import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import WSECHOD, clean_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(WSECHOD).parent
COMPOSE = ROOT / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"


def compose_valid(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def kubernetes_valid(path: Path, version: str = "1.28.0") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", version, path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def image_env() -> dict[str, str]:
    """The WSECHOD_* variables the Containerfile's ENV gives every container."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    pairs = [
        word.partition("=")
        for line in text.splitlines()
        if line.startswith("ENV ")
        for word in shlex.split(line[4:])
    ]
    return {key: value for key, _, value in pairs if key.startswith("WSECHOD_")}


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``wsechod --check-config`` as in the image: its variables, then ``env``."""
    return subprocess.run(
        [WSECHOD, "--check-config", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**image_env(), **(env or {})),
        check=False,
    )


def test_the_compose_file_is_valid_and_so_are_its_settings(tmp_path: Path) -> None:
    assert compose_valid(COMPOSE).returncode == 0, compose_valid(COMPOSE).stdout
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace:"))
    assert compose_valid(broken).returncode != 0
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    for name in ("relay-1", "relay-2"):
        service = compose["services"][name]
        env = {key: str(value) for key, value in service["environment"].items()}
        checked = check_config("--config", "", env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "warning" not in checked.stderr, checked.stderr
        assert "mode" in checked.stdout and "relay" in checked.stdout
        bad = check_config("--config", "", env={**env, "WSECHOD_HISTORY_SIZE": "lots"})
        assert bad.returncode == 2


def test_the_kubernetes_manifests_are_valid_and_so_is_their_config(tmp_path: Path) -> None:
    for version in ("1.28.0", "1.37.0"):
        valid = kubernetes_valid(KUBERNETES, version)
        assert valid.returncode == 0, valid.stdout + valid.stderr
    broken = tmp_path / "kubernetes.yaml"
    broken.write_text(KUBERNETES.read_text().replace("readinessProbe:", "readynessProbe:"))
    assert kubernetes_valid(broken).returncode != 0
    documents = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}
    config = tmp_path / "wsechod.toml"
    config.write_text(documents["ConfigMap"]["data"]["wsechod.toml"])
    assert image_env()["WSECHOD_HOST"] == "0.0.0.0"
    checked = check_config("--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "warning" not in checked.stderr, checked.stderr  # host and port: in listen
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    drain = 20.0
    assert f"drain_timeout = {drain}" in config.read_text()
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert pod["enableServiceLinks"] is False
