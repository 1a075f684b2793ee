"""Node addresses for the server: random within the overlay prefix, never colliding."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable

from gatekeeper.overlay import server_address


def random_node_address(
    prefix: ipaddress.IPv6Network, randbytes: Callable[[int], bytes] = secrets.token_bytes
) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(prefix.network_address.packed[:8] + randbytes(8))


class AddressSpaceExhausted(RuntimeError):
    pass


def allocate_node_address(
    prefix: ipaddress.IPv6Network,
    taken: Callable[[ipaddress.IPv6Address], bool],
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
    attempts: int = 64,
) -> ipaddress.IPv6Address:
    """A random address in `prefix` that is neither taken nor special.

    With 2^64 candidates a collision is vanishingly rare, so a bounded number of redraws is
    plenty; the bound only matters when `randbytes` is broken.
    """
    reserved = {prefix.network_address, server_address(prefix)}
    for _ in range(attempts):
        candidate = random_node_address(prefix, randbytes)
        if candidate not in reserved and not taken(candidate):
            return candidate
    raise AddressSpaceExhausted(f"no free address in {prefix} after {attempts} attempts")
