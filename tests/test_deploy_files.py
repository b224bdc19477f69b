"""The compose file and the Kubernetes manifests that ship beside the image: each valid for
its tool (the Compose specification's schema, Kubernetes' own schemas, strictly: an
unknown field fails), and the wsechod settings in them valid for wsechod
(``--check-config``). Each check is shown to fail on a broken copy."""

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


def kubernetes_valid(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WSECHOD, "--check-config", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**(env or {})),
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
        assert "mode" in checked.stdout and "relay" in checked.stdout
        bad = check_config("--config", "", env={**env, "WSECHOD_HISTORY_SIZE": "lots"})
        assert bad.returncode == 2


def test_the_kubernetes_manifests_are_valid_and_so_is_their_config(tmp_path: Path) -> None:
    assert kubernetes_valid(KUBERNETES).returncode == 0, kubernetes_valid(KUBERNETES).stdout
    broken = tmp_path / "kubernetes.yaml"
    broken.write_text(KUBERNETES.read_text().replace("readinessProbe:", "readynessProbe:"))
    assert kubernetes_valid(broken).returncode != 0
    documents = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}
    config = tmp_path / "wsechod.toml"
    config.write_text(documents["ConfigMap"]["data"]["wsechod.toml"])
    checked = check_config("--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    drain = 20.0
    assert f"drain_timeout = {drain}" in config.read_text()
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert pod["enableServiceLinks"] is False
