"""Credentials of the service: an optional API key for clients, an admin key for admin actions.

The admin key is `FLYWHEEL_ADMIN_KEY`, else a random token kept in `$FLYWHEEL_HOME/admin.key`
(mode 0600): admin actions always need a credential, and local tools that share the home (the
deploy flow) read the same file. Clients' `FLYWHEEL_API_KEY` never grants admin actions.
"""

from __future__ import annotations

from components.paths import admin_key_file, local_secret
from components.settings import settings


def api_key() -> str | None:
    """`FLYWHEEL_API_KEY`, or None: generation and feedback are then open."""
    return settings().api_key


def admin_key() -> str:
    """`FLYWHEEL_ADMIN_KEY`, else the home's generated admin token."""
    return settings().admin_key or local_secret(admin_key_file())
