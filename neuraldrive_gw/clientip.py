"""The client's IP address: the socket peer, or what a trusted proxy says it forwarded for."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """Walk X-Forwarded-For from the right while the hop is a trusted proxy.

    A peer outside `trusted` is the client, whatever headers it sent (so a spoofed
    X-Forwarded-For from an untrusted peer is ignored). Behind a trusted proxy, the
    right-most entry that is not itself trusted is the client; entries further left were
    written by the client and prove nothing.
    """
    if peer is None:
        return "unknown"
    if not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer        # garbage from the proxy chain: fall back to what we know
    return peer
