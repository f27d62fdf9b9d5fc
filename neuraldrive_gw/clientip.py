"""The client's IP address: the socket peer, or what a trusted proxy says it forwarded for."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


_MEMO_MAX = 4096


def parse_networks(items: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


class TrustedProxies:
    """The `trusted_proxies` networks, with the verdict per address remembered: parsing
    the peer's address on every request cost more than the rest of this module."""

    def __init__(self, items: Sequence[str]):
        self.networks = parse_networks(items)
        self._memo: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        verdict = self._memo.get(address)
        if verdict is None:
            verdict = _trusted(address, self.networks)
            if len(self._memo) >= _MEMO_MAX:     # bounded: an attacker has many addresses
                self._memo.clear()
            self._memo[address] = verdict
        return verdict


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """Walk X-Forwarded-For from the right while the hop is a trusted proxy.

    A peer outside `trusted` is the client, whatever headers it sent (so a spoofed
    X-Forwarded-For from an untrusted peer is ignored). Behind a trusted proxy, the
    right-most entry that is not itself trusted is the client; entries further left were
    written by the client and prove nothing.
    """
    if peer is None:
        return "unknown"
    if peer not in trusted:
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer        # garbage from the proxy chain: fall back to what we know
    return peer
