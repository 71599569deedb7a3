"""A local Label Studio server: headless, offline, on localhost, with a known API token.

Label Studio pins old versions of many packages, so it lives in its own virtual environment
(`.venv-labelstudio`, made by `make labelstudio`). Its data (SQLite, users, projects) lives
under `$FLYWHEEL_HOME/labelstudio`. The token is `LABEL_STUDIO_API_KEY` if set, else one
generated once and kept in `$FLYWHEEL_HOME/labelstudio/token`; Label Studio only takes it on a
fresh data folder, so the token file and the folder are created together.

    python -m scripts.label_studio_server --port 8080     # what `make labelstudio` runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from components.annotate.review import label_studio_token
from components.paths import REPO_ROOT, label_studio_dir
from components.process import Server
from components.settings import settings

VENV = REPO_ROOT / ".venv-labelstudio"
USERNAME = "reviewer@flywheel.local"


def command(port: int, folder: Path, token: str, password: str) -> list[str]:
    executable = VENV / "bin" / "label-studio"
    if not executable.exists():
        raise FileNotFoundError(f"{executable} not found: run `make labelstudio-setup` first")
    return [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(folder),
        "--username",
        USERNAME,
        "--password",
        password,
        "--user-token",
        token,
        "--enable-legacy-api-token",
    ]


def environment() -> dict[str, str]:
    """Offline and quiet: no sign-up without a link, no analytics, no version checks."""
    return {
        **os.environ,
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }


def password() -> str:
    """The reviewer's login password: `LABEL_STUDIO_PASSWORD`, else the token."""
    return settings().label_studio_password or label_studio_token(create=True)


def start(port: int, log_path: Path) -> Server:
    """Start the server in the background; `wait_ready()` on the result before using it."""
    folder = label_studio_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return Server.start(
        "Label Studio",
        command(port, folder, label_studio_token(create=True), password()),
        f"http://127.0.0.1:{port}/health/",
        log_path,
        env=environment(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.label_studio_server")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    folder = label_studio_dir()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Label Studio on http://127.0.0.1:{args.port}  (data: {folder})")
    print(f"  log in as {USERNAME}; password: LABEL_STUDIO_PASSWORD, else the API token")
    print(f"  API token: LABEL_STUDIO_API_KEY, else the file {folder / 'token'}")
    cmd = command(args.port, folder, label_studio_token(create=True), password())
    return subprocess.call(cmd, env=environment())


if __name__ == "__main__":
    sys.exit(main())
