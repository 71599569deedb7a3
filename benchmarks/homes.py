"""A fresh home for one benchmark run, so it measures from an empty registry and store."""

from __future__ import annotations

import os
import time
from pathlib import Path

from components.paths import benchmarks_dir, model_cache_dir

# Shared stores the run must not reach: it makes its own under the fresh home.
SHARED_STORES = ("MLFLOW_TRACKING_URI", "FLYWHEEL_CURATED_DIR", "FLYWHEEL_FEEDBACK_DB")


def use_fresh_home(name: str, **env: str) -> Path:
    """Point this process at `$FLYWHEEL_HOME/benchmarks/<name>-<time>` (created), keeping the
    converted base models where they are; `env` sets further variables."""
    home = benchmarks_dir() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    home.mkdir(parents=True)
    os.environ["FLYWHEEL_MODEL_CACHE"] = str(model_cache_dir())
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ.setdefault("DO_NOT_TRACK", "1")  # offline: no telemetry from the libraries
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for variable in SHARED_STORES:
        os.environ.pop(variable, None)
    os.environ.update(env)
    return home
