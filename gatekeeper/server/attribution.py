"""Which machine sent this? Events and log lines are attributed by their source address.

The source must be inside the overlay prefix and be a registered machine's address. On the
server's WireGuard link a source address is authenticated: a peer can only send from its own
/128 (allowed IPs), and the isolation table drops overlay sources arriving on other links.
"""

from __future__ import annotations

import ipaddress

from gatekeeper import netaddr
from gatekeeper.server.registry import MachineRecord, Registry


def grpc_peer_address(peer: str) -> ipaddress.IPv6Address | None:
    """`ipv6:[fdae::5]:41234` -> fdae::5; anything else (IPv4, unix) -> None."""
    address = netaddr.grpc_peer_address(peer)
    return address if isinstance(address, ipaddress.IPv6Address) else None


class Attributor:
    def __init__(self, registry: Registry, prefix: ipaddress.IPv6Network) -> None:
        self.registry = registry
        self.prefix = prefix

    def machine(self, address: ipaddress.IPv6Address | None) -> MachineRecord | None:
        if address is None or address not in self.prefix:
            return None
        return self.registry.by_address(address)
