"""The team stack's files: docker-compose validated by `docker-compose config`, the Kubernetes
manifests rendered by kustomize and checked against Kubernetes' schemas, and the Prefect
Kubernetes work pool's job template rendered as a worker renders it."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

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
