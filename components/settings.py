"""Every environment variable Flywheel reads, in one typed object.

`settings()` reads the environment when it is called, so a process that changes a variable
(the demo and the benchmarks give each run a fresh home; tests set their own) sees the change;
nothing else in the project reads `os.environ` for its own variables. Each field names its
variable; the profile's value, where there is one, applies when the variable is unset.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """What the environment says; empty variables count as unset."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True, frozen=True)

    # Where the running system keeps its state (see components/paths.py for what lies there).
    home: Path = Field(REPO_ROOT / ".flywheel", validation_alias="FLYWHEEL_HOME")
    # Converted base models, shareable between homes (tests, demos): default `<home>/models`.
    model_cache: Path | None = Field(None, validation_alias="FLYWHEEL_MODEL_CACHE")
    # Curated corrections and reviews: default the profile's `data.feedback_dir`, else the home.
    curated_dir: str | None = Field(None, validation_alias="FLYWHEEL_CURATED_DIR")
    # The shared stores; each defaults to SQLite under the home folder.
    tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    feedback_db: str | None = Field(None, validation_alias="FLYWHEEL_FEEDBACK_DB")
    redis_url: str | None = Field(None, validation_alias="FLYWHEEL_REDIS_URL")
    pushgateway_url: str | None = Field(None, validation_alias="FLYWHEEL_PUSHGATEWAY_URL")
    # The service: its profile and model, and where the monitor finds it.
    profile: str = Field("cpu-small", validation_alias="FLYWHEEL_PROFILE")
    profile_overrides: str = Field("", validation_alias="FLYWHEEL_SET")
    model_uri: str | None = Field(None, validation_alias="FLYWHEEL_MODEL_URI")
    service_url: str | None = Field(None, validation_alias="FLYWHEEL_SERVICE_URL")
    # Credentials: clients' key (generation and feedback are open without any), the admin key
    # (default: a token kept in the home), Label Studio's token (default: the local server's).
    api_key: str | None = Field(None, validation_alias="FLYWHEEL_API_KEY")
    # Named client keys instead: a file of `name: sha256-hex` lines (components/serving/auth.py).
    api_keys_file: Path | None = Field(None, validation_alias="FLYWHEEL_API_KEYS")
    admin_key: str | None = Field(None, validation_alias="FLYWHEEL_ADMIN_KEY")
    label_studio_url: str = Field("http://127.0.0.1:8080", validation_alias="LABEL_STUDIO_URL")
    label_studio_api_key: str | None = Field(None, validation_alias="LABEL_STUDIO_API_KEY")
    label_studio_password: str | None = Field(None, validation_alias="LABEL_STUDIO_PASSWORD")
    # The OpenVINO exporter's environment (`make engine-setup`).
    export_venv: Path = Field(REPO_ROOT / ".venv-export", validation_alias="FLYWHEEL_EXPORT_VENV")


def settings() -> Settings:
    """The environment's settings, read now."""
    return Settings()
