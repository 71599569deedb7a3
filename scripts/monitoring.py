"""Write the monitoring files: each profile's Prometheus alerting rules to
`deployments/monitoring/rules/<profile>.yml`, and the Grafana dashboard.

    .venv/bin/python -m scripts.monitoring            # every profile
    .venv/bin/python -m scripts.monitoring cpu-small  # one

Run it after changing a profile's `monitor:` or `serve:` thresholds or a panel; the tests
fail while a shipped file differs from what this writes.
"""

from __future__ import annotations

import json
import sys

import yaml

from components.config import PROFILES_DIR, load_profile
from components.monitor.alerts import alert_rules
from components.monitor.dashboard import dashboard
from components.paths import REPO_ROOT

MONITORING_DIR = REPO_ROOT / "deployments" / "monitoring"
RULES_DIR = MONITORING_DIR / "rules"
DASHBOARD = MONITORING_DIR / "grafana" / "dashboards" / "flywheel.json"
HEADER = "# Written by `python -m scripts.monitoring` from deployments/profiles/{name}.yaml.\n"


def rules_text(profile: str) -> str:
    config = load_profile(profile)
    body = yaml.safe_dump(alert_rules(config), sort_keys=False, width=100)
    return HEADER.format(name=config.name) + body


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(
        p.stem for p in PROFILES_DIR.glob("*.yaml")
    )
    RULES_DIR.mkdir(parents=True, exist_ok=True)
    written = {RULES_DIR / f"{name}.yml": rules_text(name) for name in names}
    written[DASHBOARD] = dashboard_text()
    for path, text in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
