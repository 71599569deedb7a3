"""Credentials of the service: an optional API key for clients, an admin key for admin actions.

The admin key is `FLYWHEEL_ADMIN_KEY`, else a random token kept in `$FLYWHEEL_HOME/admin.key`
(mode 0600): admin actions always need a credential, and local tools that share the home (the
deploy flow) read the same file. Clients' `FLYWHEEL_API_KEY` never grants admin actions.
"""

from __future__ import annotations

import os

from components.paths import flywheel_home, local_secret


def api_key() -> str | None:
    """`FLYWHEEL_API_KEY`, or None: generation and feedback are then open."""
    return os.environ.get("FLYWHEEL_API_KEY") or None


def admin_key() -> str:
    """`FLYWHEEL_ADMIN_KEY`, else the home's generated admin token."""
    return os.environ.get("FLYWHEEL_ADMIN_KEY") or local_secret(flywheel_home() / "admin.key")
