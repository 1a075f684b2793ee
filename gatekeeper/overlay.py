"""Overlay facts both ends share (spec sections 1 and 5): prefixes, addresses, endpoint swap."""

from __future__ import annotations

import hashlib
import ipaddress

from gatekeeper.netaddr import split_host_port

SIDEROLINK_SUFFIX = 0x03
TUNNEL_SUFFIX = 0x04


def overlay_prefix(installation_id: str, suffix: int = SIDEROLINK_SUFFIX) -> ipaddress.IPv6Network:
    """The /64 of an installation: last 16 bytes of sha256(id), byte 0 = 0xfd, byte 7 = suffix."""
    digest = bytearray(hashlib.sha256(installation_id.encode()).digest()[-16:])
    digest[0] = 0xFD
    digest[7] = suffix
    return ipaddress.IPv6Network((bytes(digest[:8]) + bytes(8), 64))


def server_address(prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    return prefix.network_address + 1


def is_siderolink_address(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefix: ipaddress.IPv6Network | None = None,
) -> bool:
    """The spec's quick test (0xfd .. 0x03), or the stricter one when the prefix is known."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return False
    if prefix is not None:
        return addr in prefix
    return addr.packed[0] == 0xFD and addr.packed[7] == SIDEROLINK_SUFFIX


def swap_endpoints(endpoints: list[str]) -> list[str]:
    """The first/last swap of server_endpoint (docs/compatibility.md); it is its own inverse."""
    if len(endpoints) < 2:
        return list(endpoints)
    out = list(endpoints)
    out[0], out[-1] = out[-1], out[0]
    return out


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port` (host may be a DNS name) -> (host, port); ValueError if not.

    The server checks what it advertises and the machine what it receives with this one rule
    (gatekeeper.netaddr, Go's net.SplitHostPort).
    """
    return split_host_port(endpoint, "endpoint")
