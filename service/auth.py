"""Who may call what, and who a client is: its verified key's name, else its address."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from components.serving.auth import address_identity, admin_key, api_keys, peer_address
from service.api import ApiError

Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
ADMIN = "admin"  # the identity of a client route called with the admin key


def _refused(what: str) -> ApiError:
    return ApiError(
        401,
        f"missing or wrong {what} (Authorization: Bearer <key>)",
        code="invalid_api_key",
        headers={"www-authenticate": "Bearer"},
    )


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    return credentials.credentials if credentials else ""


def _is_admin(token: str) -> bool:
    return secrets.compare_digest(token.encode(), admin_key().encode())


class ClientAuth:
    """The clients' routes: with keys configured, a verified key (or the admin key) names the
    client and anything else is 401; without keys, the client is its address (the forwarded
    one only from `trusted_proxies`). The identity is kept on `request.state.client`."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self.trusted_proxies = trusted_proxies

    async def __call__(self, request: Request, credentials: Bearer) -> None:
        keys = api_keys()
        if keys is None:
            peer = request.client.host if request.client else "unknown"
            forwarded = request.headers.get("x-forwarded-for")
            request.state.client = address_identity(
                peer_address(peer, forwarded, self.trusted_proxies)
            )
            return
        token = _token(credentials)
        name = keys.identify(token) if token else None
        if name is None and token and _is_admin(token):
            name = ADMIN
        if name is None:
            raise _refused("API key")
        request.state.client = f"key:{name}"


async def admin_auth(credentials: Bearer) -> None:
    """Admin actions always need the admin key (`FLYWHEEL_ADMIN_KEY` or the home's token)."""
    if not _is_admin(_token(credentials)):
        raise _refused("admin key")


def client_id(request: Request) -> str:
    """Who sent a request (set by `ClientAuth`): `key:<name>` or `address:<hash>`."""
    return request.state.client
