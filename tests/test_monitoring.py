"""The monitoring files: alert rules and dashboard as their profiles write them, rule unit
tests with promtool, a real Prometheus scraping a real `bentoml serve`, and the Locust file
loading it."""

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from components.config import PROFILES_DIR, load_profile
from components.monitor.alerts import alerts
from components.monitor.dashboard import dashboard
from components.monitor.pushed import report_decision, report_retrain
from scripts.monitoring import DASHBOARD, MONITORING_DIR, RULES_DIR, dashboard_text, rules_text
from tests.conftest import REPO_ROOT, free_port
from tests.test_team_stack import keda_query

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a failure, not a skip: `make test` installs them
        pytest.fail(f"{name} is missing: `make monitoring-tools` installs it (Debian packages)")
    return path


def start_pushgateway(port: int, tmp_path: Path):
    """A Pushgateway that keeps its metrics in memory only (the Debian build persists them
    to /var/lib by default, which would carry one test's pushes into the next)."""
    from components.process import Server

    return Server.start(
        "pushgateway",
        [
            tool("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            "--persistence.file=",
        ],
        f"http://127.0.0.1:{port}/-/ready",
        tmp_path / "pushgateway.log",
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_rules_follow_their_profile(profile: str) -> None:
    shipped = RULES_DIR / f"{profile}.yml"
    assert shipped.read_text() == rules_text(profile), "run `python -m scripts.monitoring`"
    thresholds = load_profile(profile).monitor
    exprs = [r["expr"] for r in yaml.safe_load(shipped.read_text())["groups"][0]["rules"]]
    assert any(f"> {thresholds.max_error_rate}" in e for e in exprs)
    assert any(f">= {thresholds.min_feedback}" in e for e in exprs)


def test_shipped_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD.read_text() == dashboard_text(), "run `python -m scripts.monitoring`"


def test_promtool_checks_the_config_and_the_rule_unit_tests_pass() -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "config", "prometheus.yml"],
        ["test", "rules", *(str(p) for p in sorted((MONITORING_DIR / "tests").glob("*.yml")))],
    ):
        done = subprocess.run(
            [promtool, *args], cwd=MONITORING_DIR, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
    checked = subprocess.run(
        [tool("amtool"), "check-config", "alertmanager.yml"],
        cwd=MONITORING_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def query(prometheus: str, expr: str) -> list:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.e2e
def test_every_alert_and_panel_has_data_from_a_real_service(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No rule, panel or autoscaling trigger is dead on arrival: each evaluates to data once
    traffic flowed."""
    from components.process import Server

    rules = tmp_path / "rules.yml"
    rules.write_text((RULES_DIR / "tiny.yml").read_text())
    port, push_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "flywheel",
                "static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}],
            },
            {
                "job_name": "flywheel-pushgateway",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{push_port}"]}],
            },
            {  # the same service as two replicas, for the monitor's view of a fleet
                "job_name": "flywheel-fleet",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{served.port}", f"localhost:{served.port}"]}
                ],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = f"http://127.0.0.1:{port}"
    server = Server.start(
        "prometheus",
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"{prometheus}/-/ready",
        tmp_path / "prometheus.log",
    )
    pushgateway = start_pushgateway(push_port, tmp_path)
    try:
        server.wait_ready(60)
        pushgateway.wait_ready(60)
        # what the flows push: a retrain that succeeded, a later one that failed, a decision
        monkeypatch.setenv("FLYWHEEL_PUSHGATEWAY_URL", f"127.0.0.1:{push_port}")
        tiny = load_profile("tiny")
        assert report_retrain(tiny, succeeded=True)
        assert report_retrain(tiny, succeeded=False) and report_decision(tiny, retrain=True)
        for i in range(4):  # answers, a stream, both ratings
            answer = httpx.post(
                f"{served.url}/generate",
                json={"prompt": f"How do I deploy {i}?", "max_new_tokens": 3},
                timeout=120,
            ).json()
            httpx.post(
                f"{served.url}/feedback",
                json={"request_id": answer["request_id"], "rating": "down" if i % 2 else "up"},
                timeout=30,
            ).raise_for_status()
        with httpx.stream(
            "POST",
            f"{served.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True},
            timeout=120,
        ) as stream:
            assert "[DONE]" in "".join(stream.iter_text())

        queries = {a.name: a.signal for a in alerts(load_profile("tiny"))}
        queries |= {
            f"panel {p['title']} / {t['refId']}": t["expr"]
            for p in dashboard()["panels"]
            for t in p["targets"]
        }
        queries["KEDA ScaledObject trigger"] = keda_query()
        empty = dict(queries)
        deadline = time.monotonic() + 90
        while empty and time.monotonic() < deadline:
            empty = {name: q for name, q in empty.items() if not query(prometheus, q)}
            time.sleep(1)
        assert not empty, f"no data for: {json.dumps(empty, indent=1)}"
        # The monitor reads a fleet from Prometheus: every replica's counters, summed.
        from components.monitor.scrape import scrape
        from flows.monitor import read_metrics

        fleet_profile = load_profile(
            "tiny",
            [f"monitor.prometheus_url={prometheus}", "monitor.prometheus_job=flywheel-fleet"],
        )
        one = scrape(served.url)
        deadline = time.monotonic() + 30
        while (fleet := read_metrics.fn(fleet_profile, "http://nowhere.invalid")).requests != (
            2 * one.requests
        ):
            assert time.monotonic() < deadline, (fleet, one)
            time.sleep(1)
        assert one.requests >= 5 and fleet.generated_tokens == 2 * one.generated_tokens
        assert fleet.latency_buckets[-1][1] == 2 * one.latency_buckets[-1][1]
        # and no query leans on a metric the service does not export (`or vector(0)` would
        # hide a misspelled numerator)
        names = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()
        used = {m for q in queries.values() for m in re.findall(r"([a-z_:]+)(?=\{|\[)", q)}
        assert used and used <= set(names["data"]), used - set(names["data"])

        loaded = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
        assert set(health) == {a.name for a in alerts(load_profile("tiny"))}
        assert set(health.values()) == {"ok"}, health
        version = query(prometheus, "flywheel_model_version")[0]["metric"]
        assert version["model_name"] == "flywheel-llm-tiny"
    finally:
        server.stop()
        pushgateway.stop()


def test_an_unreachable_pushgateway_never_fails_a_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_profile("tiny")
    monkeypatch.delenv("FLYWHEEL_PUSHGATEWAY_URL", raising=False)
    assert not report_retrain(config, succeeded=True)  # not configured: nothing to do
    monkeypatch.setenv("FLYWHEEL_PUSHGATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    assert not report_retrain(config, succeeded=False)  # nothing listens: logged, not raised
    assert not report_decision(config, retrain=True)


@pytest.mark.e2e
def test_a_failed_training_run_is_pushed_for_its_alert(
    home: Path, prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training pipeline's failure hook reports to a real Pushgateway."""
    from flows.training_pipeline import training_pipeline

    port = free_port()
    pushgateway = start_pushgateway(port, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": ""}\n')  # nothing valid to train on
    profile = yaml.safe_load((PROFILES_DIR / "tiny.yaml").read_text())
    profile["data"]["sources"] = [{"path": str(bad)}]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("FLYWHEEL_PUSHGATEWAY_URL", f"127.0.0.1:{port}")
    try:
        pushgateway.wait_ready(60)
        state = training_pipeline(profile=str(tmp_path / "broken.yaml"), return_state=True)
        assert state.is_failed()
        groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/metrics", timeout=10).json()["data"]
        pushed = {
            name: group["labels"]["profile"]
            for group in groups
            for name in group
            if name.startswith("flywheel_")
        }
        assert pushed["flywheel_retrain_last_failure_timestamp_seconds"] == "tiny"
        assert "flywheel_retrain_last_success_timestamp_seconds" not in pushed
    finally:
        pushgateway.stop()


@pytest.mark.e2e
def test_the_locust_file_loads_a_real_service_without_failures(served, tmp_path: Path) -> None:
    """`make loadtest`'s Locust file, headless against a real `bentoml serve`: every kind of
    call it makes is answered, and none fails."""
    locust = REPO_ROOT / ".venv-locust/bin/locust"
    if not locust.is_file():  # a failure, not a skip: `make test` builds it
        pytest.fail("Locust is missing: `make loadtest-setup` builds .venv-locust")
    done = subprocess.run(
        [
            str(locust),
            "-f",
            str(REPO_ROOT / "benchmarks/locustfile.py"),
            "--headless",
            f"--host={served.url}",
            "--users=4",
            "--spawn-rate=4",
            "--run-time=20s",
            f"--csv={tmp_path / 'locust'}",
        ],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "FLYWHEEL_LOAD_MAX_TOKENS": "4",
            "FLYWHEEL_LOAD_RATE_EVERY": "2",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "locust_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    calls = ["models", "generate", "chat", "chat stream", "chat stream: first token", "feedback"]
    assert {name: int(rows[name]["Request Count"]) > 0 for name in calls} == dict.fromkeys(
        calls, True
    ), done.stderr[-3000:]
    assert int(rows["Aggregated"]["Failure Count"]) == 0, done.stderr[-3000:]
