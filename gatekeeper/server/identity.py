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

from gatekeeper.netaddr import parse_ip
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

# The u-coordinates whose every X25519 shared secret is all zero (the points of order 1, 2, 4
# and 8, on the curve and its twist, as libsodium lists them): 0, 1, the two points of order
# 8, p-1, and the non-canonical p and p+1. X25519 ignores the top bit, so each also counts
# with bit 255 set. A set lookup, not a trial exchange: a storm checks thousands of keys on
# the thread that competes for the GIL with the tunnel's loop (tests check it against one).
_P = 2**255 - 19
_LOW_ORDER_U = (
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    _P - 1,
    _P,
    _P + 1,
)
_LOW_ORDER = frozenset(
    (u | top).to_bytes(32, "little") for u in _LOW_ORDER_U for top in (0, 1 << 255)
)


def is_low_order(key: PublicKey) -> bool:
    """True for public keys whose every shared secret is zero (RFC 7748 section 6.1)."""
    return key.raw in _LOW_ORDER


def host_of(text: str) -> Host | None:
    """The IP of a gRPC peer (`ipv6:[a]:p`, `ipv4:a:p`) or an endpoint (`[a]:p`, `a:p`)."""
    text = clean_peer(text)
    for kind in ("ipv6:", "ipv4:"):
        if text.startswith(kind):
            text = text[len(kind) :]
    host = text.rpartition(":")[0] if ":" in text else text
    host = host.strip("[]").split("%")[0]
    try:
        addr = parse_ip(host)
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
