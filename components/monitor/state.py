"""What one monitor run leaves for the next."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MonitorState:
    """What one monitor run leaves for the next (a JSON file under `$FLYWHEEL_HOME/monitor`)."""

    last_run_at: float | None = None
    last_scrape: dict[str, Any] | None = None
    last_retrain_at: float | None = None
    latency_baselines: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(path)  # a crash mid-write never leaves a half file
