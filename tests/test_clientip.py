"""Client IP derivation: only trusted proxies may speak for the client (SPEC §3 step 3)."""

from __future__ import annotations

import pytest

from neuraldrive_gw.clientip import TrustedProxies, client_ip

LOOPBACK = TrustedProxies(["127.0.0.1/32", "::1/128"])


@pytest.mark.parametrize("peer,xff,expected", [
    ("203.0.113.9", [], "203.0.113.9"),
    ("203.0.113.9", ["10.0.0.1"], "203.0.113.9"),              # untrusted peer: header ignored
    ("127.0.0.1", [], "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.7"], "198.51.100.7"),           # Caddy on loopback
    ("127.0.0.1", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),  # left part was client-written
    ("127.0.0.1", ["1.2.3.4", "198.51.100.7"], "198.51.100.7"),
    ("127.0.0.1", ["198.51.100.7, 127.0.0.1"], "198.51.100.7"),
    ("127.0.0.1", ["not-an-ip"], "127.0.0.1"),
    ("::1", ["2001:db8::5"], "2001:db8::5"),
    (None, ["1.2.3.4"], "unknown"),
])
def test_client_ip(peer: str | None, xff: list[str], expected: str) -> None:
    assert client_ip(peer, xff, LOOPBACK) == expected
