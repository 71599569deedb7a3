"""Credentials of the service: clients' API keys, the admin key, and who a client is.

Clients' keys: `FLYWHEEL_API_KEYS` names a file of `name: sha256-hex` lines (one per client or
team; the hash of the key, never the key), or `FLYWHEEL_API_KEY` is one key shared by all
(named `shared`). Without either, generation and feedback are open and a client is its network
address: the peer's, or the one a proxy listed in `serve.trusted_proxies` forwarded. Every
limit and every agreement counts these identities, never a header a client can choose.

The admin key is `FLYWHEEL_ADMIN_KEY`, else a random token kept in `$FLYWHEEL_HOME/admin.key`
(mode 0600): admin actions always need a credential, and local tools that share the home (the
deploy flow) read the same file. Clients' keys never grant admin actions.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from components.paths import admin_key_file, local_secret
from components.settings import settings

SHARED = "shared"  # the name of `FLYWHEEL_API_KEY`
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,47}$")
KEY_HASH = re.compile(r"^(sha256:)?([0-9a-f]{64})$")


class ApiKeysError(ValueError):
    """The keys file cannot be read; the message names the line."""


@dataclass(frozen=True)
class ApiKeys:
    """The clients' keys, by the SHA-256 of the key."""

    names: dict[str, str]  # sha256 hex -> name

    def identify(self, key: str) -> str | None:
        """The name of the client whose key this is, or None."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = None
        for known, name in self.names.items():  # every entry compared, in constant time each
            if hmac.compare_digest(digest, known):
                found = name
        return found


def parse_api_keys(text: str, source: str) -> ApiKeys:
    """`name: sha256-hex` per line; blank lines and `#` comments are skipped."""
    names: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, digest = (part.strip() for part in line.partition(":"))
        match = KEY_HASH.match(digest.lower())
        if not KEY_NAME.match(name) or match is None:
            raise ApiKeysError(
                f"{source}:{number}: expected `name: <sha256 of the key, 64 hex digits>` "
                f"with a name of letters, digits and _.@- (got {raw.strip()[:40]!r})"
            )
        if match.group(2) in names:
            raise ApiKeysError(f"{source}:{number}: the same key as '{names[match.group(2)]}'")
        if name in names.values():
            raise ApiKeysError(f"{source}:{number}: the name '{name}' is used twice")
        names[match.group(2)] = name
    if not names:
        raise ApiKeysError(f"{source}: no keys (a `name: sha256-hex` line each)")
    return ApiKeys(names)


@functools.lru_cache(maxsize=4)
def _keys_file(path: str, modified_ns: int) -> ApiKeys:
    return parse_api_keys(Path(path).read_text(encoding="utf-8"), path)


def api_keys() -> ApiKeys | None:
    """The clients' keys (re-read when the file changes), or None: generation and feedback
    are then open."""
    config = settings()
    if config.api_keys_file is not None:
        path = config.api_keys_file
        try:
            return _keys_file(str(path), path.stat().st_mtime_ns)
        except OSError as exc:
            raise ApiKeysError(f"FLYWHEEL_API_KEYS: cannot read {path}: {exc}") from None
    if config.api_key is not None:
        return ApiKeys({hashlib.sha256(config.api_key.encode()).hexdigest(): SHARED})
    return None


def peer_address(peer: str, forwarded_for: str | None, trusted: Sequence[str]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the last address
    in `X-Forwarded-For` that is not one (each proxy appends the address it was called from)."""
    networks = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if not forwarded_for or not is_trusted(peer):
        return peer
    for address in reversed([a.strip() for a in forwarded_for.split(",") if a.strip()]):
        if not is_trusted(address):
            return address
    return peer


def address_identity(address: str) -> str:
    """An address as stored (the inference log, the memory): hashed, never the address."""
    return "address:" + hashlib.sha256(address.encode()).hexdigest()[:16]


def admin_key() -> str:
    """`FLYWHEEL_ADMIN_KEY`, else the home's generated admin token."""
    return settings().admin_key or local_secret(admin_key_file())
