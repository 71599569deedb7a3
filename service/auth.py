"""Who may call what: the clients' API key, the admin key, and who a client is for limits."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from components.serving.auth import admin_key, api_key
from service.api import ApiError

Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def _check(credentials: HTTPAuthorizationCredentials | None, key: str, what: str) -> None:
    token = credentials.credentials if credentials else ""
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise ApiError(
            401,
            f"missing or wrong {what} (Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )


async def client_auth(credentials: Bearer) -> None:
    """`FLYWHEEL_API_KEY` when set; generation and feedback are open otherwise."""
    key = api_key()
    if key is not None:
        _check(credentials, key, "API key")


async def admin_auth(credentials: Bearer) -> None:
    """Admin actions always need the admin key (`FLYWHEEL_ADMIN_KEY` or the home's token)."""
    _check(credentials, admin_key(), "admin key")


def client_id(request: Request) -> str:
    """Who sent a request, for per-client limits: a hash of its API key, else its address."""
    token = request.headers.get("authorization", "")
    host = request.client.host if request.client else "unknown"
    return hashlib.sha256((token or host).encode()).hexdigest()[:16]
