"""Where Flywheel keeps its state. Nothing here touches the disk until a function is called."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def flywheel_home() -> Path:
    """The folder that holds all state the running system writes (`FLYWHEEL_HOME`)."""
    return Path(os.environ.get("FLYWHEEL_HOME", REPO_ROOT / ".flywheel")).resolve()


def model_cache_dir() -> Path:
    """Converted and downloaded base models: `FLYWHEEL_MODEL_CACHE`, else `$FLYWHEEL_HOME/models`.

    Kept overridable on its own so that several homes (tests, demos) can share one 500 MB
    conversion of the default base model.
    """
    return Path(os.environ.get("FLYWHEEL_MODEL_CACHE", flywheel_home() / "models")).resolve()


def tracking_uri() -> str:
    """The MLflow tracking URI: `MLFLOW_TRACKING_URI`, else SQLite under the home folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{flywheel_home() / 'mlflow.db'}"


def resolve_path(path: str | Path) -> Path:
    """Resolve a profile path: absolute paths stay, relative ones are taken from the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def local_secret(path: Path) -> str:
    """A random token kept in `path` (mode 0600), created on first use."""
    import secrets

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(20))
    return path.read_text().strip()
