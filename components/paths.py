"""Where Flywheel keeps its state: every location under `FLYWHEEL_HOME` is named here, and
nothing here touches the disk until a function is called (`local_secret` creates its file).

The home holds (with the default SQLite stores):
    mlflow.db, mlartifacts/      the MLflow registry and its artifacts
    feedback.db, spool/          the inference log and feedback, and rows waiting for it
    curated/                     curated corrections and reviews, and the live set
    runs/<profile>/              training runs' working folders (checkpoints, resumable)
    training-prompts/            each registered run's training prompts (the router's domain)
    serving/<model>/<version>/   converted engine weights and their quality checks
    eval-cache/                  answers of evaluations that did not change
    monitor/                     the monitor's state and its retrain lock
    models/                      converted base models (`FLYWHEEL_MODEL_CACHE`)
    labelstudio/                 the local Label Studio server's data and token
    logs/, service.pid           the service the deploy flow started
    admin.key                    the admin token, when `FLYWHEEL_ADMIN_KEY` is unset
    benchmarks/                  benchmark results and their fresh homes
    prefect/, bentoml/, ...      the libraries' own homes (set by the Makefile)
"""

from __future__ import annotations

import secrets
from pathlib import Path

from components.settings import REPO_ROOT, settings


def flywheel_home() -> Path:
    """The folder that holds all state the running system writes (`FLYWHEEL_HOME`)."""
    return settings().home.resolve()


def model_cache_dir() -> Path:
    """Converted and downloaded base models: `FLYWHEEL_MODEL_CACHE`, else `$FLYWHEEL_HOME/models`.

    Kept overridable on its own so that several homes (tests, demos) can share one 500 MB
    conversion of the default base model.
    """
    return (settings().model_cache or flywheel_home() / "models").resolve()


def tracking_uri() -> str:
    """The MLflow tracking URI: `MLFLOW_TRACKING_URI`, else SQLite under the home folder."""
    return settings().tracking_uri or f"sqlite:///{flywheel_home() / 'mlflow.db'}"


def artifacts_dir(experiment: str) -> Path:
    """Where a local MLflow registry keeps an experiment's artifacts."""
    return flywheel_home() / "mlartifacts" / experiment


def feedback_db_url() -> str:
    """`FLYWHEEL_FEEDBACK_DB`, else a SQLite file under the home folder."""
    return settings().feedback_db or f"sqlite:///{flywheel_home() / 'feedback.db'}"


def spool_dir() -> Path:
    """Inference-log rows written while the database was away, waiting to be sent."""
    return flywheel_home() / "spool"


def curated_dir(feedback_dir: str | None) -> Path:
    """Where curated versions live: `FLYWHEEL_CURATED_DIR`, else the profile's folder, else
    `$FLYWHEEL_HOME/curated` (state, so `make clean` removes it with everything else)."""
    chosen = settings().curated_dir or feedback_dir
    return resolve_path(chosen) if chosen else flywheel_home() / "curated"


def runs_dir(profile: str) -> Path:
    """Training runs' working folders of one profile."""
    return flywheel_home() / "runs" / profile


def training_prompts_dir(run_id: str) -> Path:
    """A registered run's training prompts, downloaded for the router."""
    return flywheel_home() / "training-prompts" / f"run-{run_id}"


def serving_dir(model: str, version: str) -> Path:
    """A model version's converted engine weights and quality checks."""
    return flywheel_home() / "serving" / model / version


def eval_cache_dir() -> Path:
    return flywheel_home() / "eval-cache"


def monitor_dir() -> Path:
    """The monitor's state and its one-retrain-at-a-time lock."""
    return flywheel_home() / "monitor"


def label_studio_dir() -> Path:
    """The local Label Studio server's data folder (and its token file)."""
    return flywheel_home() / "labelstudio"


def service_pid_file() -> Path:
    return flywheel_home() / "service.pid"


def service_log_file() -> Path:
    return flywheel_home() / "logs" / "service.log"


def bentoml_home() -> Path:
    """BentoML's home for a service the project starts: `$FLYWHEEL_HOME/bentoml`."""
    return flywheel_home() / "bentoml"


def admin_key_file() -> Path:
    return flywheel_home() / "admin.key"


def benchmarks_dir() -> Path:
    return flywheel_home() / "benchmarks"


def resolve_path(path: str | Path) -> Path:
    """Resolve a profile path: absolute paths stay, relative ones are taken from the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def local_secret(path: Path) -> str:
    """A random token kept in `path` (mode 0600), created on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(20))
    return path.read_text().strip()
