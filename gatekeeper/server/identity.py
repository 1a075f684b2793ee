"""What the server knows about who holds a WireGuard key: low-order keys, live sessions, hosts.

Provision carries no proof of anything but the join token. What a request cannot forge is
where it comes from, and what WireGuard has authenticated: a peer's endpoint is the address
its last authenticated packet came from, and a handshake needs the private key. The
provisioner uses both to tell a machine restarting (same address, or after its old session
died) from a second machine claiming a connected machine's identity.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gatekeeper.server.ratelimit import clean_peer
from gatekeeper.wireguard.backend import Device, PeerStats
from gatekeeper.wireguard.keys import PublicKey

# WireGuard's Reject-After-Time: a session older than this carries no traffic, so a peer whose
# last handshake is older is not connected, whatever its counters say.
LIVE_SESSION = 180.0
# One device dump serves the decisions of this many seconds (a reboot storm of thousands of
# machines then costs one dump per interval, not one per machine).
DUMP_MAX_AGE = 1.0

Host = ipaddress.IPv4Address | ipaddress.IPv6Address

# Any fixed scalar works: X25519 clamps scalars to multiples of 8, so a point of order 1, 2, 4
# or 8 (the all-zero key, and the few others, in any of their encodings) always yields the
# all-zero shared secret, which `exchange` refuses.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def is_low_order(key: PublicKey) -> bool:
    """True for public keys whose every shared secret is zero (RFC 7748 section 6.1)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(key.raw))
    except ValueError:
        return True
    return False


def host_of(text: str) -> Host | None:
    """The IP of a gRPC peer (`ipv6:[a]:p`, `ipv4:a:p`) or an endpoint (`[a]:p`, `a:p`)."""
    text = clean_peer(text)
    for kind in ("ipv6:", "ipv4:"):
        if text.startswith(kind):
            text = text[len(kind) :]
    host = text.rpartition(":")[0] if ":" in text else text
    host = host.strip("[]").split("%")[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class LivePeers:
    """The device's peers, read at most every DUMP_MAX_AGE seconds, by public key."""

    def __init__(
        self,
        device: Device,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self.clock = clock
        self.wall = wall
        self._read_at = float("-inf")
        self._peers: dict[str, PeerStats] = {}

    def session(self, public_key: str) -> tuple[bool, str | None]:
        """(has a live session, its endpoint) for this key on the device."""
        now = self.clock()
        if now - self._read_at > DUMP_MAX_AGE:
            self._peers = {p.public_key.base64(): p for p in self.device.peers()}
            self._read_at = now
        stats = self._peers.get(public_key)
        if stats is None or stats.last_handshake is None:
            return False, None
        return self.wall() - stats.last_handshake < LIVE_SESSION, stats.endpoint
