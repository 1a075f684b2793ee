"""Which machine sent this? Events and log lines are attributed by their source address.

The source must be inside the overlay prefix and be a registered machine's address. On the
server's WireGuard link a source address is authenticated: a peer can only send from its own
/128 (allowed IPs), and the isolation table drops overlay sources arriving on other links.

The registry is asked off the event loop (a PostgreSQL registry is a network call), and each
machine found is kept for `ttl` seconds: a machine sending many events costs one lookup, and while
the registry is unreachable the last answer for an address stands (no machine can be added
or removed then), so telemetry from known machines is still taken in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

from gatekeeper import netaddr
from gatekeeper.server.registry import MachineRecord, Registry, RegistryError

TTL = 10.0
# Cached answers at most (an address each: a few hundred bytes).
MAX_CACHED = 100_000


def grpc_peer_address(peer: str) -> ipaddress.IPv6Address | None:
    """`ipv6:[fdae::5]:41234` -> fdae::5; anything else (IPv4, unix) -> None."""
    address = netaddr.grpc_peer_address(peer)
    return address if isinstance(address, ipaddress.IPv6Address) else None


class Attributor:
    def __init__(
        self, registry: Registry, prefix: ipaddress.IPv6Network, *, ttl: float = TTL
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.ttl = ttl
        self._cache: dict[ipaddress.IPv6Address, tuple[float, MachineRecord]] = {}
        self._inflight: dict[ipaddress.IPv6Address, asyncio.Future[MachineRecord | None]] = {}

    async def machine(self, address: ipaddress.IPv6Address | None) -> MachineRecord | None:
        """The registered machine at `address`; None when there is none (or no address).

        Raises RegistryError only when the registry cannot answer and nothing is known yet.
        """
        if address is None or address not in self.prefix:
            return None
        now = time.monotonic()
        cached = self._cache.get(address)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        # One lookup per address at a time, its callers resumed in the order they asked: a
        # machine's connections are then counted in the order they arrived.
        lookup = self._inflight.get(address)
        if lookup is None:
            lookup = asyncio.ensure_future(asyncio.to_thread(self.registry.by_address, address))
            self._inflight[address] = lookup
            lookup.add_done_callback(lambda _: self._inflight.pop(address, None))
        try:
            record = await asyncio.shield(lookup)
        except RegistryError:
            if cached is not None:
                return cached[1]
            raise
        if record is None:
            # Not kept: an address handed to a new machine a moment later must count at once.
            self._cache.pop(address, None)
            return None
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[address] = (now, record)
        return record
