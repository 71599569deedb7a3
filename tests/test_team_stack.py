"""The team stack's files: docker-compose validated by `docker-compose config`, the Kubernetes
manifests rendered by kustomize and checked against Kubernetes' schemas, the Prefect
Kubernetes work pool's job template rendered as a worker renders it, and the Bento that
`bentoml containerize` builds from."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from components.paths import REPO_ROOT

DEPLOYMENTS = REPO_ROOT / "deployments"
COMPOSE_FILE = DEPLOYMENTS / "compose" / "docker-compose.yaml"
KUBERNETES = DEPLOYMENTS / "kubernetes"
KUBERNETES_VERSION = "1.32"  # the oldest release the manifests promise to fit
STACK = {
    "postgres",
    "prefect-server",
    "worker",
    "mlflow",
    "service",
    "prometheus",
    "pushgateway",
    "alertmanager",
    "grafana",
    "label-studio",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a failure, not a skip: `make test` installs them
        pytest.fail(f"{name} is missing: `make ops-tools` installs it")
    return path


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE_FILE), "config"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid_and_holds_the_whole_stack() -> None:
    done = compose_config({"FLYWHEEL_ADMIN_KEY": "k"})
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert set(config["services"]) == STACK
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):  # every file it mounts is shipped
            source = volume.split(":")[0]  # `config` writes bind mounts with absolute paths
            if source.startswith("/"):
                assert Path(source).exists(), (name, source)
    # the stack shares one PostgreSQL and points every part at the same servers
    worker, service = config["services"]["worker"], config["services"]["service"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert service["environment"]["FLYWHEEL_FEEDBACK_DB"].startswith("postgresql+psycopg2://")
    assert (
        "postgresql+asyncpg://"
        in (
            config["services"]["prefect-server"]["environment"][
                "PREFECT_API_DATABASE_CONNECTION_URL"
            ]
        )
    )
    assert "--backend-store-uri postgresql" in config["services"]["mlflow"]["command"]


def test_compose_refuses_to_start_without_an_admin_key() -> None:
    done = compose_config({})
    assert done.returncode != 0
    assert "FLYWHEEL_ADMIN_KEY" in done.stderr


def test_compose_prometheus_config_checks_and_scrapes_the_service() -> None:
    prometheus = DEPLOYMENTS / "compose" / "prometheus.yml"
    checked = subprocess.run(
        [tool("promtool"), "check", "config", "--syntax-only", str(prometheus)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(prometheus.read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert jobs == {"flywheel": ["service:3000"], "flywheel-pushgateway": ["pushgateway:9091"]}
    for rules in config["rule_files"]:  # mounted from deployments/monitoring/rules
        assert (DEPLOYMENTS / "monitoring" / "rules" / Path(rules).name).is_file()


def rendered_manifests(overlay: str) -> list[dict]:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def scaled_object(docs: list[dict]) -> dict:
    [found] = [d for d in docs if d["kind"] == "ScaledObject"]
    return found


def test_kubernetes_overlay_renders_to_valid_manifests() -> None:
    docs = rendered_manifests("cpu-small")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "ScaledObject"}
    for doc in docs:
        if doc["kind"] != "ScaledObject":  # a KEDA CRD: checked below
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"].get("namespace") == "flywheel", doc["kind"]

    deployment = kinds["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/flywheel-service:latest"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config_map = container["envFrom"][0]["configMapRef"]["name"]
    assert config_map == kinds["ConfigMap"]["metadata"]["name"]  # the generator's hashed name
    assert kinds["ConfigMap"]["data"]["FLYWHEEL_PROFILE"] == "cpu-small"
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 3000

    keda = scaled_object(docs)
    assert keda["apiVersion"] == "keda.sh/v1alpha1"
    assert keda["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= keda["spec"]["minReplicaCount"] <= keda["spec"]["maxReplicaCount"]
    [trigger] = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) >= {"serverAddress", "query", "threshold"}
    assert float(trigger["metadata"]["threshold"]) > 0  # KEDA wants the number as a string
    assert isinstance(trigger["metadata"]["threshold"], str)


def keda_query() -> str:
    """The autoscaler's Prometheus query (the monitoring test evaluates it on live data)."""
    return scaled_object(rendered_manifests("cpu-small"))["spec"]["triggers"][0]["metadata"][
        "query"
    ]


def test_prefect_kubernetes_job_template_renders_a_valid_job() -> None:
    from prefect.utilities.templating import apply_values

    template = json.loads((KUBERNETES / "prefect-work-pool.json").read_text())
    variables = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values |= {"command": "prefect flow-run execute", "env": {"PREFECT_API_URL": "http://p/api"}}
    config = apply_values(template["job_configuration"], values)
    job = config["job_manifest"]
    # what the Kubernetes worker does before it creates the Job
    [container] = job["spec"]["template"]["spec"]["containers"]
    container["args"] = shlex.split(container["args"])
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    assert job["metadata"]["namespace"] == "flywheel"
    assert container["envFrom"][0]["configMapRef"]["name"] == "flywheel-config"
    # every placeholder names a declared variable
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template)))
    assert placeholders <= set(variables), placeholders - set(variables)


@pytest.mark.e2e
def test_the_built_bento_serves_and_its_containerfile_installs_the_weights(
    champion_home: Path, tmp_path: Path
) -> None:
    """What `make bento` packages is complete: `bentoml serve` of the built Bento (from the
    Bento store, away from the repository) answers, and the Dockerfile that `bentoml
    containerize` builds from runs the setup script that installs the packaged weights."""
    from components.process import Server
    from tests.conftest import free_port, module_cli, sqlite_uri

    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "FLYWHEEL_HOME": str(champion_home),
        "MLFLOW_TRACKING_URI": sqlite_uri(champion_home),
        "FLYWHEEL_PROFILE": "tiny",
    }

    module_cli("bentoml", env, "build", "--version", "test", timeout=300)
    bento = tmp_path / "bentoml" / "bentos" / "flywheel" / "test"
    steps = (bento / "env/docker/Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", steps, re.M), steps[:500]
    # the setup script runs once the pinned requirements are installed in the image's venv
    install = steps.index("pip install -r $BENTO_PATH/env/python/requirements.txt")
    (script,) = re.findall(r"&& (\./env/docker/script__\w+)", steps)
    assert steps.index(script) > install
    assert (bento / script).read_text() == (DEPLOYMENTS / "bento/setup.sh").read_text()
    # ... and installs the weights `make setup` installs, with the same pins
    pinned = re.findall(
        r"^([\w-]+==[\w.]+)$", (REPO_ROOT / "requirements-models.txt").read_text(), re.M
    )
    assert pinned and re.findall(r"([\w-]+==[\w.]+)", (bento / script).read_text()) == pinned

    port = free_port()
    server = Server.start(
        "bentoml serve flywheel:test",
        [sys.executable, "-m", "bentoml", "serve", "flywheel:test", "--port", str(port)],
        f"http://127.0.0.1:{port}/readyz",
        tmp_path / "bento-serve.log",
        env=env,
        cwd=tmp_path,  # nothing read from the repository by a relative path
    )
    try:
        server.wait_ready(180)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/generate",
            json={"prompt": "How do I deploy?", "max_new_tokens": 3},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model-version"] == "1"
    finally:
        server.stop()
