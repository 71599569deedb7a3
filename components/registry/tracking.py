"""MLflow tracking: one run per pipeline run, logged to by run id from any stage or thread."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.paths import REPO_ROOT, artifacts_dir, tracking_uri


def configure_mlflow() -> str:
    """Point MLflow at the configured store and return its URI."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def mlflow_client() -> Any:
    """An `MlflowClient` on the configured store; the only way Flywheel code gets a client.

    A bare `MlflowClient()` falls back to MLflow's own default (a `mlflow.db` in the working
    folder), so every client is made here, with the URI passed explicitly.
    """
    from mlflow.tracking import MlflowClient

    uri = configure_mlflow()
    _create_local_store(uri)
    return MlflowClient(tracking_uri=uri)


@functools.cache
def _create_local_store(uri: str) -> None:
    """Create a SQLite store's tables once, under a file lock: two processes that open a new
    store at once (the service's gateway and generator) otherwise race in its migrations."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    lock_path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry's


def ensure_experiment(name: str) -> str:
    """Experiment id for `name`; a new local experiment keeps artifacts under FLYWHEEL_HOME."""
    client = mlflow_client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = artifacts_dir(name).as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def git_commit() -> str:
    """The repository's commit, with `-dirty` if there are uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, for MLflow params and metrics."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class RunLogger:
    """Logs to one MLflow run by id, so stages running in worker threads share the run."""

    run_id: str

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str]) -> RunLogger:
        run = mlflow_client().create_run(
            ensure_experiment(experiment), run_name=run_name, tags=tags
        )
        return cls(run.info.run_id)

    def _client(self) -> Any:
        return mlflow_client()

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self._client().log_batch(self.run_id, params=items[start : start + 100])

    def metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if items:
            self._client().log_batch(self.run_id, metrics=items)

    def training_log(self, metrics: dict[str, Any], step: int) -> None:
        """The trainer's logs (loss, learning rate, ...) as `train.*` metrics at `step`."""
        self.metrics({f"train.{k}": v for k, v in metrics.items()}, step)

    def tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client().set_tag(self.run_id, key, str(value))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._client().log_artifact(self.run_id, str(path), folder)

    def json(self, data: dict[str, Any], name: str) -> None:
        self._client().log_dict(self.run_id, data, name)

    def table(self, rows: list[dict[str, Any]], name: str) -> None:
        import mlflow

        if rows:
            mlflow.log_table(
                {k: [r.get(k) for r in rows] for k in rows[0]}, name, run_id=self.run_id
            )

    def finish(self, status: str = "FINISHED") -> None:
        self._client().set_terminated(self.run_id, status)
