"""Who a client is: named keys verified by their hash, or the address (forwarded only by a
trusted proxy). The service-level checks are in test_service_logic and test_service_lifecycle."""

import hashlib
import re
from pathlib import Path

import pytest

from components.serving.auth import (
    SHARED,
    ApiKeysError,
    api_keys,
    parse_api_keys,
    peer_address,
)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_names_its_client_and_nothing_else_does() -> None:
    keys = parse_api_keys(
        f"# team keys\nalice: {_hash('a-key')}\n\nbob: sha256:{_hash('b-key')}  # CI\n", "keys"
    )
    assert keys.identify("a-key") == "alice" and keys.identify("b-key") == "bob"
    assert keys.identify("forged") is None and keys.identify(_hash("a-key")) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("alice a-key", "keys:1: expected `name: <sha256"),
        (f"alice: {_hash('x')[:-1]}", "keys:1: expected"),
        (f"al ice: {_hash('x')}", "keys:1: expected"),
        (f"alice: {_hash('x')}\nbob: {_hash('x')}", "keys:2: the same key as 'alice'"),
        (f"alice: {_hash('x')}\nalice: {_hash('y')}", "keys:2: the name 'alice' is used twice"),
        ("# nothing\n", "keys: no keys"),
    ],
)
def test_a_bad_keys_file_says_which_line(text: str, message: str) -> None:
    with pytest.raises(ApiKeysError, match=re.escape(message)):
        parse_api_keys(text, "keys")


def test_keys_come_from_the_file_or_the_one_shared_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FLYWHEEL_API_KEYS", raising=False)
    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    assert api_keys() is None  # open
    monkeypatch.setenv("FLYWHEEL_API_KEY", "s3cret")
    assert api_keys().identify("s3cret") == SHARED
    path = tmp_path / "keys"
    path.write_text(f"alice: {_hash('a')}\n")
    monkeypatch.setenv("FLYWHEEL_API_KEYS", str(path))
    assert api_keys().identify("a") == "alice" and api_keys().identify("s3cret") is None
    path.write_text(f"carol: {_hash('c')}\n")  # a changed file is read again
    import os

    os.utime(path, ns=(1, 10**18))
    assert api_keys().identify("c") == "carol"
    monkeypatch.setenv("FLYWHEEL_API_KEYS", str(tmp_path / "missing"))
    with pytest.raises(ApiKeysError, match="cannot read"):
        api_keys()


@pytest.mark.parametrize(
    "peer, forwarded, expected",
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a proxy: its header is ignored
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.7", "198.51.100.1"),  # a client's own
        ("10.0.0.2", "10.0.0.5", "10.0.0.2"),  # only proxies: the peer
        ("10.0.0.2", "not-an-address", "not-an-address"),
    ],
)
def test_a_forwarded_address_counts_only_from_a_trusted_proxy(
    peer: str, forwarded: str | None, expected: str
) -> None:
    assert peer_address(peer, forwarded, ["10.0.0.0/8"]) == expected


def test_trusted_proxies_must_be_addresses() -> None:
    from components.config import ProfileError, load_profile

    with pytest.raises(ProfileError, match=r"serve\.trusted_proxies"):
        load_profile("tiny", ["serve.trusted_proxies=[proxy.local]"])
